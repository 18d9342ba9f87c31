"""``data audit`` decodes every image in full and reports tiny images (issue 30).

A JPEG whose middle bytes are garbage decodes without an error in Pillow (it drops libjpeg's
warnings); the audit checks the compressed data (:func:`medseg.io.plain.jpeg_data_problem`) and
reports the file as unreadable. Images smaller than ``--min-size`` pixels along a side are listed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.data.audit import audit
from medseg.io import read_image
from medseg.io.plain import jpeg_data_problem
from tests.conftest import run_cli

SIZE = 64


def _picture(seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    base = (np.sin(xx / (5 + seed)) + np.cos(yy / 4)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 20, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(_picture(seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def garble(data: bytes, garbage: bytes) -> bytes:
    """``data`` with the middle of its entropy-coded data replaced by ``garbage``."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    mid = (start + len(data) - 2) // 2
    return data[:mid] + garbage + data[mid + len(garbage) :]


#: A restart marker where the file has none (Pillow decodes past it): found by the marker check.
MARKER_GARBAGE = b"\xff\xd3" + bytes(30)
#: Random bytes (seed 1). Only about half of random
#: garbage is found (see jpeg_data_problem); this sample is one that is.
RANDOM_GARBAGE = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"img{i}.jpg").write_bytes(_jpeg(10 * c + i))
    (root / "a" / "garbled.jpg").write_bytes(garble(_jpeg(7), MARKER_GARBAGE))
    (root / "b" / "noise.jpg").write_bytes(garble(_jpeg(8), RANDOM_GARBAGE))
    PILImage.fromarray(np.full((3, 3), 128, np.uint8)).save(root / "b" / "tiny.png")
    return root


def test_pillow_alone_accepts_the_garbled_jpegs(dataset: Path) -> None:
    """Why the audit checks more than Pillow: both files read without an error."""
    for name in ("a/garbled.jpg", "b/noise.jpg"):
        assert read_image(dataset / name).array.shape == (SIZE, SIZE, 1)


def test_jpeg_data_problem(dataset: Path, tmp_path: Path) -> None:
    for i in range(3):
        assert jpeg_data_problem(dataset / "a" / f"img{i}.jpg") is None
    marker = jpeg_data_problem(dataset / "a" / "garbled.jpg")
    assert marker and "JPEG data is corrupt (restart marker 3 where 0 was due" in marker
    noise = jpeg_data_problem(dataset / "b" / "noise.jpg")
    assert noise and noise.startswith(f"{dataset / 'b' / 'noise.jpg'}: JPEG data is corrupt")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_jpeg(3)[:-200])
    assert "truncated" in jpeg_data_problem(cut)
    assert jpeg_data_problem(dataset / "b" / "tiny.png") is None  # not a JPEG


def test_audit_reports_garbled_jpegs_unreadable_and_tiny_images(dataset: Path) -> None:
    report = audit(dataset, "class_folders", workers=1)
    assert report["n_images"] == 9 and report["n_readable"] == 7
    problems = report["problems"]
    assert any(p.startswith("a/garbled.jpg: JPEG data is corrupt") for p in problems), problems
    assert any(p.startswith("b/noise.jpg: JPEG data is corrupt") for p in problems), problems
    [tiny] = [p for p in problems if "tiny.png" in p]
    assert (
        tiny
        == "b/tiny.png: image is 3x3 pixels, smaller than the minimum 16 along a side (--min-size)"
    )
    report = audit(dataset, "class_folders", workers=1, min_size=2)
    assert not any("tiny.png" in p for p in report["problems"])


@pytest.mark.slow
def test_cli_audit_min_size(dataset: Path, tmp_path: Path) -> None:
    proc = run_cli("data", "audit", str(dataset), "--min-size", "70", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    problems = json.loads((tmp_path / "out" / "audit.json").read_text())["problems"]
    assert sum("smaller than the minimum 70" in p for p in problems) == 7  # all but the two bad
    assert any("garbled.jpg: JPEG data is corrupt" in p for p in problems)
    proc = run_cli("data", "audit", str(dataset), "--min-size", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "min_size must be >= 1" in proc.stderr


def test_second_decoder_finds_garbage_without_markers(tmp_path: Path) -> None:
    """Garbage without a 0xFF byte passes the marker check; the second decoder refuses it."""
    garbage = np.random.default_rng(8).integers(0, 255, 64, dtype=np.uint8).tobytes()
    assert b"\xff" not in garbage
    path = tmp_path / "x.jpg"
    path.write_bytes(garble(_jpeg(8), garbage))
    problem = jpeg_data_problem(path)
    assert problem and "JPEG data is corrupt (libjpeg error" in problem


def test_audit_montage_of_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    # matplotlib cannot draw the surrogates a non-UTF-8 name decodes to: the title is escaped
    import os

    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        PILImage.fromarray(_picture(1)).save(tmp_path / "ds" / cls / "ok.png")
    odd = os.fsencode(tmp_path / "ds" / "a") + b"/scan_\xff.png"
    PILImage.fromarray(_picture(2)).save(os.fsdecode(odd), format="PNG")
    report = audit(tmp_path / "ds", "class_folders", workers=1, out_dir=tmp_path / "out")
    assert report["n_images"] == 3 and (tmp_path / "out" / "audit.json").is_file()
