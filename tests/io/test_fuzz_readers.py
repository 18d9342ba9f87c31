"""Fuzzing the readers: mutated DICOM, PNG and NIfTI files give an image or a medseg error.

Each example takes a valid file (pydicom's bundled ``MR_small.dcm``, ``CT_small.dcm`` and RLE
``MR_small_RLE.dcm``; 8- and 16-bit PNGs and a ``.nii``/``.nii.gz`` written here), applies a few
random mutations (bit flips, byte overwrites, insertions of random bytes, truncation), writes it
to a temporary file and reads it with :func:`medseg.io.read_image` and
:func:`medseg.io.read_mask`. A third test mutates one slice of a three-slice DICOM series and
reads the folder (also with :func:`medseg.io.read_dicom_series`). Reading may succeed (a flipped
pixel bit is still an image) or raise a :class:`~medseg.errors.MedsegError` naming the file in
one line; anything else (a ``ValueError`` from pydicom, an ``OSError`` from nibabel, ...) is a
reader bug.

The default run is small and reproducible (``derandomize``: the same examples on every run, no
example database). ``MEDSEG_FUZZ_EXAMPLES=5000 pytest tests/io/test_fuzz_readers.py`` runs more, and
``MEDSEG_FUZZ_SEED=<n>`` draws a different, still reproducible, set.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from medseg.errors import MedsegError
from medseg.io import read_dicom_series, read_image, read_mask

# pydicom and nibabel warn about the damage they read past; the assertions are about errors.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("MEDSEG_FUZZ_SEED", "0"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("MEDSEG_FUZZ_SEED"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_grey16() -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti(gz: bool) -> bytes:
    data = np.random.default_rng(2).normal(0, 1, (6, 5, 4)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("seed.nii.gz" if gz else "seed.nii")
        nib.save(image, str(path))
        return path.read_bytes()


def _dicom(name: str) -> bytes:
    path = PYDICOM_TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not installed")
    return path.read_bytes()


SEEDS = {
    "dicom_mr": (".dcm", lambda: _dicom("MR_small.dcm")),
    "dicom_ct": (".dcm", lambda: _dicom("CT_small.dcm")),
    "dicom_rle": (".dcm", lambda: _dicom("MR_small_RLE.dcm")),
    "png_grey8": (".png", _png),
    "png_grey16": (".png", _png_grey16),
    "nifti": (".nii", lambda: _nifti(gz=False)),
    "nifti_gz": (".nii.gz", lambda: _nifti(gz=True)),
}


@st.composite
def mutations(draw, size: int) -> list[tuple]:
    """A few edits: (kind, position, payload), positions as fractions of the current length.

    Positions are biased towards the start of the file (headers live there) half of the time.
    """
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "truncate", "flip"]))
        head = draw(st.booleans())
        pos = draw(st.integers(0, min(size, 1024) - 1 if head else max(size - 1, 0)))
        if kind == "flip":
            ops.append((kind, pos, draw(st.integers(0, 7))))
        elif kind == "overwrite":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=8))))
        elif kind == "insert":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=32))))
        else:
            ops.append((kind, pos, None))
    return ops


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, payload in ops:
        if not out:
            break
        pos = min(pos, len(out) - 1)
        if kind == "flip":
            out[pos] ^= 1 << payload
        elif kind == "overwrite":
            out[pos : pos + len(payload)] = payload
        elif kind == "insert":
            out[pos:pos] = payload
        else:
            del out[pos:]
    return bytes(out)


def read_both(data: bytes, suffix: str) -> None:
    """Read ``data`` as an image and as a mask; only medseg errors may come out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzzed{suffix}"
        path.write_bytes(data)
        for reader in (read_image, read_mask):
            try:
                reader(path)
            except MedsegError as e:
                message = str(e)
                assert str(path) in message, message  # the file is named
                assert "\n" not in message, message


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_files_are_valid(name: str) -> None:
    """The unmutated seeds read cleanly, so that the mutations are what the fuzzer tests."""
    suffix, make = SEEDS[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"seed{suffix}"
        path.write_bytes(make())
        assert read_image(path).array.size > 0


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mutated_files_give_only_medseg_errors(name: str) -> None:
    suffix, make = SEEDS[name]
    original = make()

    @seed(SEED)
    @FUZZ
    @given(ops=mutations(len(original)))
    def check(ops: list[tuple]) -> None:
        read_both(mutate(original, ops), suffix)

    check()


def _series_slices() -> list[bytes]:
    """Three slices of one series (MR_small at 0, 1 and 2 mm along z), as file bytes."""
    base = pydicom.dcmread(PYDICOM_TEST_FILES / "MR_small.dcm")
    slices = []
    for k in range(3):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.InstanceNumber = k + 1
        buf = io.BytesIO()
        ds.save_as(buf)
        slices.append(buf.getvalue())
    return slices


def test_mutated_slice_in_a_series_gives_only_medseg_errors() -> None:
    if not (PYDICOM_TEST_FILES / "MR_small.dcm").is_file():
        pytest.skip("pydicom test file MR_small.dcm is not installed")
    slices = _series_slices()

    @seed(SEED)
    @FUZZ
    @given(victim=st.integers(0, 2), ops=mutations(len(slices[0])))
    def check(victim: int, ops: list[tuple]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "series"
            folder.mkdir()
            for k, data in enumerate(slices):
                (folder / f"IM{k}.dcm").write_bytes(mutate(data, ops) if k == victim else data)
            for reader in (read_image, read_mask, read_dicom_series):
                try:
                    reader(folder)
                except MedsegError as e:
                    assert str(folder) in str(e) and "\n" not in str(e), str(e)

    check()
