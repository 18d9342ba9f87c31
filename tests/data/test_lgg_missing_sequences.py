"""scripts/lgg_missing_sequences.py on a tiny LGG folder whose patients' sequences are known."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "lgg_missing_sequences", REPO / "scripts" / "lgg_missing_sequences.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patient(root: Path, name: str, copies: tuple[int, ...], slices: int = 3) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    for i in range(1, slices + 1):
        x = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        for c in copies:
            x[..., c] = x[..., 1]
        Image.fromarray(x).save(folder / f"{name}_{i}.tif")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        Image.fromarray(mask).save(folder / f"{name}_{i}_mask.tif")


def test_patterns_and_dice_per_pattern(tmp_path, capsys):
    root = tmp_path / "kaggle_3m"
    _patient(root, "PA", ())
    _patient(root, "PB", (0, 2))
    _patient(root, "PC", (2,))
    run = tmp_path / "run"
    (run / "fold_1").mkdir(parents=True)
    # PA: Dice 2*8/(16+0+0) = 1.0 over two slices; PB: 0 (all missed); PC: 2*4/(8+4+0) = 2/3.
    rows = [
        ("PA/PA_1.tif", "PA", 4, 0, 0),
        ("PA/PA_2.tif", "PA", 4, 0, 0),
        ("PB/PB_1.tif", "PB", 0, 0, 16),
        ("PC/PC_1.tif", "PC", 4, 4, 0),
    ]
    with open(run / "fold_1" / "oof.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "group", "tp", "fp", "fn"])
        w.writerows(rows)
    script = _script()
    assert script.sequence_pattern(str(root)) == {
        "PA": "complete",
        "PB": "all_flair",
        "PC": "one_copied",
    }
    assert script.main([str(root), str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["patients"] == {"all_flair": 1, "complete": 1, "one_copied": 1}
    row = out[str(run)]
    assert row["complete"] == {"n": 1, "mean": 1.0}
    assert row["all_flair"] == {"n": 1, "mean": 0.0}
    assert row["incomplete"] == {"n": 2, "mean": round(1 / 3, 4), "below_0.5": 1}
    assert row["all"] == round((1.0 + 0.0 + 2 / 3) / 3, 4)
    assert "PA" not in json.dumps(out) and "PB" not in json.dumps(out)  # counted, never named
