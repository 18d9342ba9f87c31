"""Inference: serving trained models on new images.

* :mod:`~medseg.inference.predictor`: the loaded model (export, run or CV folder, or an
  ensemble of them) behind one interface;
* :mod:`~medseg.inference.serving`: the graphs that serve a model (raw pixels in);
* :mod:`~medseg.inference.export`: ``medseg export`` (SavedModel, TFLite, model card);
* ``medseg predict``: :mod:`~medseg.inference.predict` (the entry and the local executor),
  :mod:`~medseg.inference.ray_predict` and :mod:`~medseg.inference.ray_worker` (the Ray
  executor), both built on :mod:`~medseg.inference.cases` (what the inputs are),
  :mod:`~medseg.inference.case` (the work on one case) and :mod:`~medseg.inference.batch`
  (resumable batches);
* :mod:`~medseg.inference.postprocess`, :mod:`~medseg.inference.uncertainty` (MC dropout) and
  :mod:`~medseg.inference.explain` (Grad-CAM).
"""
