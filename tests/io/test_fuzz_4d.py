"""Fuzzing NIfTI headers with 4D and 5D shapes (issue 30): random dimensions, time units, intents
and step sizes give an image (whose 4th dimension is reported) or one medseg error line naming
the file; never another exception. Reproducible like ``tests/io/test_fuzz_readers.py``
(``MEDSEG_FUZZ_EXAMPLES`` / ``MEDSEG_FUZZ_SEED``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from medseg.errors import DataError, MedsegError
from medseg.io import read_image, read_mask
from medseg.io.base import check_channels, volume_count

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("MEDSEG_FUZZ_SEED", "30"))

shapes = st.lists(st.integers(1, 6), min_size=4, max_size=5).map(tuple)
units = st.sampled_from(["unknown", "sec", "msec", "usec", "hz", "ppm", "rads"])
intents = st.sampled_from(["none", "vector", "t test", "label"])
steps = st.sampled_from([0.0, 1.0, 2.5, -1.0, float("nan"), float("inf"), 1e30])


@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    shape=shapes, unit=units, intent=intents, step=steps, gz=st.booleans(), model=st.integers(1, 4)
)
def test_4d_5d_headers_give_an_image_or_one_medseg_error(shape, unit, intent, step, gz, model):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("f.nii.gz" if gz else "f.nii")
        img = nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4))
        img.header.set_xyzt_units("mm", unit)
        if intent != "none":
            img.header.set_intent(intent, (1.0,) if intent == "t test" else ())
        zooms = list(img.header.get_zooms())
        zooms[3] = step
        # nibabel refuses negative or non-finite zooms: then its default stays
        with contextlib.suppress(Exception):
            img.header.set_zooms(zooms)
        nib.save(img, str(path))
        squeezed = list(shape)
        while len(squeezed) > 4 and squeezed[-1] == 1:
            squeezed.pop()
        for read in (read_image, read_mask):
            try:
                out = read(path)
            except MedsegError as e:
                assert str(path) in str(e) and "\n" not in str(e), e
                assert len(squeezed) > 4 or squeezed[3] > 1, e  # a plain 3D file was refused
                continue
            assert len(squeezed) == 4
            if read is read_mask:
                assert squeezed[3] == 1 and out.ndim == 3
                continue
            n = squeezed[3]
            assert out.array.shape[-1] == n and volume_count(out) == n
            try:
                check_channels(out, model, [f"c{i}" for i in range(model)])
            except DataError as e:
                assert n != model and f"{n} volumes along the 4th dimension" in str(e)
            else:
                assert n in (1, model)
