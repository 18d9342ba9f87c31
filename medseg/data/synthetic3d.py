"""Synthetic 3D phantoms with two touching structures, and the files real datasets come in.

Modelled on MONAI's ``monai.data.synthetic.create_test_image_3d`` (random ellipsoids plus noise
in a volume), shaped like the MSD hippocampus task: two structures that touch, label 1
"anterior" (towards the top rows, as :mod:`medseg.io` puts anterior) and label 2 "posterior",
inside a larger blob (the "head") that is brighter than the background, with smooth intensity
bias and Gaussian noise. Their size, elongation and position vary with the seed.

* :func:`phantom3d`: one volume in memory (DxHxWxC float32, DxHxW uint8 labels).
* :func:`write_msd_dataset`: an MSD folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``) of
  NIfTI files with an anisotropic spacing and (``oblique``) a slightly rotated affine; shapes
  differ a little from case to case. Two channels are written as nnU-Net's ``_0000``/``_0001``
  files, or as one 4D file (``four_d=True``).
* :func:`write_dicom_series`: an MR DICOM series of one volume (one file per slice, int16 with
  RescaleSlope/Intercept, geometry from an affine) that :func:`medseg.io.read_dicom_series`
  reads back as the same array, spacing and affine.
* :func:`lps_affine`: the (slice, row, col, 1) -> LPS mm affine of an axial volume, optionally
  rotated a little (what :func:`write_msd_dataset` writes); :func:`write_nifti_volume` saves a
  volume with such an affine.

Everything is deterministic in the seed. The DICOM files carry a synthetic PatientID
(:data:`PATIENT_ID`), never a real one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medseg.data.phantoms import derive_rng, smooth_noise

logger = logging.getLogger(__name__)

LABELS = {0: "background", 1: "anterior", 2: "posterior"}
"""Labels of every phantom, as ``dataset.json`` names them."""

PATIENT_ID = "SYNTH-3D"
"""PatientID (and PatientName) of the synthetic DICOM series."""

# LPS direction of the array axes of an axial volume: slice -> superior (+z), row -> posterior
# (+y), column -> patient left (+x); the columns of this matrix.
_AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
# RAS <-> LPS: negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Stored int16 values of a DICOM series span 0.._DICOM_LEVELS.
_DICOM_LEVELS = 30000


def phantom3d(
    shape: Sequence[int] = (24, 28, 20), seed: int = 0, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume: two touching ellipsoids inside a brighter blob, with noise.

    Args:
        shape: (D, H, W) voxels, each >= 8.
        seed: the phantom's size, shape, position, contrast and noise follow from it.
        channels: channels of the image; channel ``c > 0`` is another contrast of the same
            anatomy (the structures swap brightness, its own noise).

    Returns:
        ``(image, labels)``: float32 DxHxWxC intensities around 0..1, uint8 DxHxW labels
        (0 background, 1 anterior, 2 posterior; both structures are present).

    Raises:
        ValueError: a shape axis smaller than 8 or ``channels`` < 1.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom3d: shape must be 3 axes of at least 8 voxels, got {shape}")
    if channels < 1:
        raise ValueError(f"phantom3d: channels must be >= 1, got {channels}")
    rng = derive_rng(seed, "phantom3d")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    # The blob ("head"): a large ellipsoid a little off-centre.
    head = _ellipsoid(grid, rng.uniform(-0.08, 0.08, 3), rng.uniform(0.78, 0.92, 3)) <= 1.0
    # Two structures along the row axis, the posterior one behind (below) the anterior one.
    centre = rng.uniform(-0.1, 0.1, 3)
    radii_a = rng.uniform([0.3, 0.26, 0.3], [0.4, 0.34, 0.4])
    radii_p = radii_a * rng.uniform(0.8, 1.0, 3)
    offset = np.array([0.0, 0.9 * (radii_a[1] + radii_p[1]) / 2, 0.0])
    dist_a = _ellipsoid(grid, centre - offset, radii_a)
    dist_p = _ellipsoid(grid, centre + offset, radii_p)
    labels = np.zeros(shape, np.uint8)
    inside = np.minimum(dist_a, dist_p) <= 1.0
    labels[inside & (dist_a <= dist_p)] = 1
    labels[inside & (dist_a > dist_p)] = 2
    image = np.empty((*shape, channels), np.float32)
    for c in range(channels):
        crng = derive_rng(seed, "phantom3d-channel", c)
        tissue = np.where(head, crng.uniform(0.45, 0.55), crng.uniform(0.05, 0.12))
        bright, dark = crng.uniform(0.8, 0.95), crng.uniform(0.2, 0.3)
        first, second = (bright, dark) if c % 2 == 0 else (dark, bright)
        tissue = np.where(labels == 1, first, np.where(labels == 2, second, tissue))
        tissue = ndimage.gaussian_filter(tissue, 0.6)  # partial-volume edges
        bias = 1.0 + 0.08 * smooth_noise(crng, shape, max(shape) / 3)
        noise = crng.normal(0.0, 0.04, shape)
        image[..., c] = tissue * bias + noise
    return image, labels


def lps_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The 4x4 (slice, row, col, 1) -> LPS mm affine of an axial volume centred on the origin.

    Args:
        shape: (D, H, W) voxels.
        spacing: (slice, row, col) mm.
        angles_deg: a rotation (x, y, z Euler angles, degrees) of the whole grid; keep each
            below about 30 degrees so that the volume stays closest to axial.
    """
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ _AXIAL @ np.diag(np.asarray(spacing, dtype=np.float64))
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def write_msd_dataset(
    root: str | Path,
    n_cases: int = 8,
    shape: Sequence[int] = (24, 28, 20),
    spacing: Sequence[float] = (2.0, 1.0, 1.5),
    oblique: bool = True,
    channels: int = 1,
    seed: int = 0,
    *,
    four_d: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an MSD dataset of :func:`phantom3d` volumes as NIfTI files.

    ``<root>/imagesTr/phantom_NNN.nii.gz``, ``<root>/labelsTr/phantom_NNN.nii.gz`` and
    ``<root>/dataset.json`` (labels :data:`LABELS`, modality ``{0: "MRI"}``; channels ``c > 0``
    are named ``"T2"``, ``"FLAIR"``, ...). Each case's shape is ``shape`` plus up to 2 voxels per
    axis (from the seed); its affine has ``spacing`` and, when ``oblique``, a rotation of a few
    degrees (different per case). Several channels are written as ``phantom_NNN_0000.nii.gz``
    ... (nnU-Net style, listed in ``dataset.json`` as ``phantom_NNN.nii.gz``), or as one 4D file
    when ``four_d``.

    Args:
        root: the dataset folder (created).
        n_cases: number of cases.
        shape: (D, H, W) of a typical case.
        spacing: (slice, row, col) mm of every case.
        oblique: rotate each case's grid by a few degrees.
        channels: image channels.
        seed: everything follows from it.
        four_d: write several channels as one 4D file instead of one file per channel.
        overwrite: replace an existing non-empty ``root``.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` exists, is not empty and ``overwrite`` is false.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root}: folder is not empty; pass overwrite=True to replace it")
        shutil.rmtree(root)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = ["MRI", "T2", "FLAIR", "ADC"]
    training = []
    for i in range(n_cases):
        rng = derive_rng(seed, "msd-case", i)
        grow = rng.integers(0, 3, 3)
        case_shape = tuple(int(s) + int(d) for s, d in zip(shape, grow, strict=True))
        angles = rng.uniform(-8.0, 8.0, 3) if oblique else np.zeros(3)
        affine = lps_affine(case_shape, spacing, angles)
        image, labels = phantom3d(case_shape, seed=seed * 1000 + i, channels=channels)
        case = f"phantom_{i:03d}"
        if channels == 1 or four_d:
            write_nifti_volume(root / "imagesTr" / f"{case}.nii.gz", image, affine)
        else:
            for c in range(channels):
                write_nifti_volume(
                    root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image[..., c], affine
                )
        write_nifti_volume(root / "labelsTr" / f"{case}.nii.gz", labels, affine)
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    description = {
        "name": "SyntheticPhantom3D",
        "description": "Synthetic phantoms: two touching ellipsoids (medseg.data.synthetic3d)",
        "tensorImageSize": "4D" if channels > 1 and four_d else "3D",
        "modality": {str(c): names[c % len(names)] for c in range(channels)},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=1) + "\n")
    logger.info("%s: wrote %d synthetic cases", root, n_cases)
    return root


def write_dicom_series(
    folder: str | Path,
    image: np.ndarray,
    spacing: Sequence[float],
    affine_lps: np.ndarray | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a DxHxW volume as an MR DICOM series, one file per slice, in shuffled file order.

    Pixels are int16 with a RescaleSlope/Intercept spanning the volume's range, so the values
    read back differ by at most half a slope step. ImagePositionPatient,
    ImageOrientationPatient, PixelSpacing and SliceThickness come from the geometry, so that
    :func:`medseg.io.read_dicom_series` returns the same array, spacing and affine (for an
    affine whose slice axis points along the cross product of its column and row directions,
    as :func:`lps_affine` gives; otherwise the reader returns the slices in reverse order).

    Args:
        folder: where the files go (created; files named ``slice_<random>.dcm``).
        image: DxHxW (or DxHxWx1) intensities.
        spacing: (slice, row, col) mm.
        affine_lps: 4x4 (slice, row, col, 1) -> LPS mm; None: axial at the origin.
        seed: file names and UIDs' order.

    Returns:
        The files, in slice order.

    Raises:
        ValueError: the image is not DxHxW or the affine does not match ``spacing``.
    """
    volume = np.asarray(image, dtype=np.float64)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"write_dicom_series: expected a DxHxW volume, got {volume.shape}")
    spacing = tuple(float(s) for s in spacing)
    affine = np.asarray(affine_lps if affine_lps is not None else lps_affine(volume.shape, spacing))
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(norms, spacing, rtol=1e-4):
        raise ValueError(f"write_dicom_series: affine spacing {norms} differs from {spacing}")
    low, high = float(volume.min()), float(volume.max())
    slope = (high - low) / _DICOM_LEVELS if high > low else 1.0
    stored = np.round((volume - low) / slope).astype(np.int16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    orientation = [*(affine[:3, 2] / spacing[2]), *(affine[:3, 1] / spacing[1])]
    order = rng.permutation(volume.shape[0])
    paths = []
    for k in range(volume.shape[0]):
        ds = _mr_slice(stored[k], slope, low, spacing)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in affine[:3] @ [k, 0, 0, 1]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        path = folder / f"slice_{order[k]:04d}_{rng.integers(10**6):06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("%s: wrote a DICOM series of %d slices", folder, len(paths))
    return paths


# --------------------------------------------------------------------------- helpers


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised squared distance to ``centre`` (<= 1 inside the ellipsoid)."""
    return np.sum(((grid - centre) / radii) ** 2, axis=-1)


def write_nifti_volume(path: str | Path, array: np.ndarray, affine_lps: np.ndarray) -> Path:
    """Save a DxHxW[xC] array so that :func:`medseg.io.read_image` returns it with this affine.

    The voxel order is (col, row, slice[, channel]), the NIfTI affine the RAS equivalent of
    ``affine_lps`` ((slice, row, col, 1) -> LPS mm, e.g. from :func:`lps_affine`), so the array
    comes back unchanged as long as the grid is within 45 degrees of axial. The data type is
    the array's.

    Returns:
        ``path`` as a Path.
    """
    data = np.asarray(array)
    data = data.transpose(2, 1, 0, 3) if data.ndim == 4 else data.transpose(2, 1, 0)
    index = np.zeros((4, 4))
    index[0, 2] = index[1, 1] = index[2, 0] = index[3, 3] = 1.0  # (c, r, s) -> (s, r, c)
    affine = _RAS_TO_LPS @ affine_lps @ index
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return Path(path)


def _mr_slice(pixels: np.ndarray, slope: float, intercept: float, spacing: tuple) -> FileDataset:
    """One MR Image Storage slice with synthetic identity and the given int16 pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = ds.PatientName = PATIENT_ID
    # Type 2 attributes of the patient, study, series and equipment modules (empty is allowed);
    # DICOM SEG writers (highdicom) copy them from the source images.
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.StudyDate, ds.StudyTime = "20000101", "000000"
    ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
    ds.Manufacturer = "medseg synthetic"
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = 1
    ds.SeriesDescription = "synthetic phantom"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
    ds.SliceThickness = float(spacing[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
