"""``medseg evaluate MODEL --data``: reading overlapped with the model (reader threads, model
calls as soon as their images are read) gives the metrics of reading everything first."""

from __future__ import annotations

import json

import pytest

from medseg.evaluation.scoring import evaluate_model


@pytest.mark.slow
def test_streamed_scoring_gives_the_metrics_of_reading_everything_first(
    tiny_unet_run, tiny_synth, tmp_path
):
    data = tiny_synth / "segmentation"
    streamed = evaluate_model(tiny_unet_run, data, tmp_path / "a", batch_size=4)
    # an "ensemble" of the model with itself reads the whole folder first, then predicts: the
    # mean of two equal probabilities is the same probabilities
    whole = evaluate_model(
        tiny_unet_run, data, tmp_path / "b", batch_size=4, ensemble_with=[tiny_unet_run]
    )
    for m in (streamed, whole):
        for key in ("model", "ensemble_with", "inference_img_s"):
            m.pop(key)
    assert json.dumps(streamed, sort_keys=True) == json.dumps(whole, sort_keys=True)
    for name in ("cases.csv", "groups.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
