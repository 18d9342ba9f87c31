"""Scoring a 3D model on volumes (medseg.evaluation.score3d, used by training, ``medseg evaluate``
and ``medseg tune``'s mirror TTA): each case read ahead and scored in threads while the model
predicts the next gives the rows of one case after another."""

from __future__ import annotations

import json

import medseg.evaluation.score3d as score3d
from medseg.data.scan_msd import describe
from medseg.data.synthetic3d import write_msd_dataset
from medseg.evaluation.volumetric import case_rows
from medseg.inference.postprocess import largest_component_per_label
from medseg.io.msd import read_case_image, read_case_labels
from tests.inference.test_stream3d import ThresholdVolumes


def test_rows_read_ahead_and_scored_in_threads_equal_one_case_after_another(tmp_path):
    root = write_msd_dataset(tmp_path / "msd", n_cases=4, shape=(20, 24, 16), spacing=(2, 1, 1.5))
    cases = describe(root).cases
    model = ThresholdVolumes()
    expected = []
    for case in cases:  # the loop before the threads
        image = read_case_image(case, model.channels)
        truth = read_case_labels(case, model.labels)
        spacing = image.meta.spacing
        pred = model.predict(image.array, spacing, image.meta.affine)["labels"]
        for name, mask in (("none", pred), ("largest", largest_component_per_label(pred))):
            args = (case.case_id, case.case_id, mask, truth, spacing, model.labels, 2.0)
            expected += [{**row, "postprocess": name} for row in case_rows(*args)]
    rows = score3d._predict_and_score(model, cases, 2.0)
    assert json.dumps(rows) == json.dumps(expected)
    assert len(rows) == 4 * 2 * 2  # cases x structures x post-processing
    assert score3d._predict_and_score(model, [], 2.0) == []
