"""The graphs that serve a model: raw pixels in, probabilities and masks or labels out.

:func:`serving_function` is the ``serve`` signature of an export and what a
:class:`~medseg.inference.predictor.Predictor` runs for a run folder: it repeats the training
preprocessing in-graph (:class:`medseg.data.preprocess.Preprocessing`), averages the models'
probabilities (:func:`medseg.models.ensemble.model_probabilities`, with optional horizontal-flip
TTA) and maps segmentation outputs back to the input size. :func:`model_function` is the
``model`` signature (and the TFLite graph): the preprocessed batch to probabilities at the model
size.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from medseg.data.preprocess import Preprocessing
from medseg.models.ensemble import as_model_list, model_probabilities


def serving_function(
    model: keras.Model | Sequence[keras.Model],
    task: str,
    prep: Preprocessing,
    threshold: float,
    *,
    tta: bool = False,
):
    """A ``tf.function`` from raw NHWC pixels to probabilities and masks/labels.

    Args:
        model: the trained Keras model, or the models of an ensemble (mean probability).
        task: ``segmentation`` or ``classification``.
        prep: the preprocessing of the run's config (``Preprocessing.from_config``).
        threshold: foreground threshold of binary segmentation masks.
        tta: average over the image and its horizontal flip.
    """
    models = as_model_list(model)
    channels = models[0].input_shape[-1]
    n_out = models[0].output_shape[-1]

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="image")]
    )
    def serve(image):
        x = prep.apply(image)
        probs = model_probabilities(models, x, tta)
        if task == "classification":
            return {"probabilities": probs, "label": tf.argmax(probs, -1, output_type=tf.int32)}
        probs = prep.restore(probs, tf.shape(image)[1:3])
        if n_out == 1:
            mask = tf.cast(probs[..., 0] > threshold, tf.int32)
        else:
            mask = tf.argmax(probs, -1, output_type=tf.int32)
        return {"probabilities": probs, "mask": mask}

    return serve


def model_function(
    model: keras.Model | Sequence[keras.Model], size: Sequence[int], *, tta: bool = False
):
    """A ``tf.function`` from a preprocessed ``[batch, H, W, C]`` batch at the model size to
    ``probabilities`` at the model size (the ``model`` signature, and the TFLite graph)."""
    models = as_model_list(model)
    channels = models[0].input_shape[-1]

    @tf.function(input_signature=[tf.TensorSpec([None, *size, channels], tf.float32, name="image")])
    def model_fn(image):
        return {"probabilities": model_probabilities(models, image, tta)}

    return model_fn
