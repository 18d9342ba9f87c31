"""``medseg evaluate --data`` scores each patient as soon as its slices are predicted
(medseg.evaluation.scoring's patient scorer): the same case rows, patient rows and metrics as
scoring the whole folder at the end (the code before the streaming, restated here)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

import medseg.evaluation.scoring as scoring
from medseg.evaluation.evaluate import label_maps, segmentation_row
from medseg.evaluation.patients import group_surface_rows, patient_volumes
from medseg.inference.postprocess import postprocess
from medseg.models.metrics import dice_from_counts


def _blobs(rng, shape) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0)


def _folder(seed: int = 0):
    """Slices of five patients in an interleaved sample order (a patient completes late), one
    patient with slices of two shapes, one without any foreground in its truth."""
    rng = np.random.default_rng(seed)
    samples, probs, truth = [], [], []
    for k in range(5):
        for j in range(3 + 2 * k):
            shape = (24, 20) if not (k == 3 and j % 2) else (16, 20)
            samples.append(SimpleNamespace(id=f"p{k}_{j + 1}", group=f"patient{k}"))
            p = _blobs(rng, shape)
            probs.append((1 / (1 + np.exp(-40 * p)))[..., None].astype(np.float32))
            t = (_blobs(rng, shape) > 0.05).astype(np.uint8)
            truth.append(t * 0 if k == 4 else t)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order], [probs[i] for i in order], [truth[i] for i in order]


def _reference(samples, probs, truth, post, tolerance):
    """The case and patient rows as ``evaluate --data`` computed them for the whole folder."""
    threshold, min_lesion_voxels, largest_component = post
    masks = [label_maps(p, threshold) for p in probs]
    if min_lesion_voxels > 1 or largest_component:
        volumes = patient_volumes([s.group for s in samples], [s.id for s in samples])
        for idx in volumes.values():
            kw = dict(min_size_voxels=min_lesion_voxels, largest_component=largest_component)
            if len({masks[i].shape for i in idx}) == 1:
                vol = postprocess(np.stack([masks[i] for i in idx]), **kw)
                for i, m in zip(idx, vol, strict=True):
                    masks[i] = m
            else:
                for i in idx:
                    masks[i] = postprocess(masks[i], **kw)
    rows = []
    for s, m, t in zip(samples, masks, truth, strict=True):
        row = segmentation_row(s.id, s.group, m, t)
        row["dice"] = round(dice_from_counts(row["tp"], row["fp"], row["fn"]), 6)
        rows.append(row)
    ids, groups = [s.id for s in samples], [s.group for s in samples]
    group_rows = group_surface_rows(
        ids, groups, [m > 0 for m in masks], [np.asarray(t) > 0 for t in truth], tolerance
    )
    return rows, group_rows


@pytest.mark.parametrize("post", [(0.5, 0, False), (0.3, 12, True), (0.7, 0, True)])
def test_patients_scored_as_they_complete_equal_the_whole_folder(post):
    samples, probs, truth = _folder()
    ref_rows, ref_groups = _reference(samples, probs, truth, post, 1.0)
    scorer = scoring._PatientScorer(samples, post, 1.0)
    held_probs, held_truth = list(probs), list(truth)
    done = 0
    for step in (5, 1, 8, 3, 100):  # model calls of any size, in sample order
        end = min(done + step, len(samples))
        scorer.predicted(range(done, end), held_probs, held_truth)
        done = end
    rows, group_rows = scorer.result()
    assert rows == ref_rows
    assert json.dumps(group_rows) == json.dumps(ref_groups)  # NaN-safe, key order included
    assert all(p is None for p in held_probs) and all(t is None for t in held_truth)
    metrics = scoring._segmentation_metrics(rows, group_rows, 1.0, 200, 0)
    ref = scoring._segmentation_metrics(ref_rows, ref_groups, 1.0, 200, 0)
    assert json.dumps(metrics, sort_keys=True) == json.dumps(ref, sort_keys=True)
    assert metrics["n_groups"] == 5 and metrics["n_images"] == len(samples)


def test_a_failing_patient_stops_the_scoring_with_its_error():
    samples, probs, truth = _folder()
    truth[0] = truth[0][:4]  # a truth of another shape than its prediction
    scorer = scoring._PatientScorer(samples, (0.5, 0, False), 1.0)
    scorer.predicted(range(len(samples)), list(probs), list(truth))
    with pytest.raises(ValueError):
        scorer.result()
