"""Writers for ``medseg predict`` outputs: PNG masks and overlays, NIfTI label volumes, DICOM SEG
and the ``predictions.csv`` / ``predictions.json`` tables.

Every file goes through a temporary name and a rename (:func:`medseg.utils.atomic_path`,
:func:`medseg.io.write_nifti_like`, :func:`medseg.utils.atomic_write_text`), so a killed process
never leaves a half-written file under its final name.

DICOM SEG (:func:`write_seg`) is written with highdicom: a BINARY segmentation whose frames
reference the source SOP instances (one segment per label, ``"tumour"`` for a binary model).

Patient data in the SEG: the SEG IOD (DICOM PS3.3 A.51) makes the Patient and General Study
modules mandatory, copied from the source, so that a PACS files the SEG with the source study.
highdicom copies every attribute of the patient and study modules (also the optional Patient
Study and Clinical Trial modules and Type 3 attributes such as PatientAge, PatientComments,
OtherPatientIDsSequence, StudyDescription); medseg keeps only what the standard requires,
:data:`SEG_IDENTITY` (Type 1/2 attributes of the General Study module, Type 1/2/1C/2C of the
Patient module, the conditional ones being those of non-human subjects and de-identified data),
with the source's values, and drops the rest, together with the source's acquisition equipment
(institution, station name, serial number) that highdicom lists in the optional
ContributingEquipmentSequence. The SEG is the only output that holds patient data, and only
inside the file: file names, tables and logs never do (unless ``--keep-identifiers``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import medseg
from medseg.io import ImageMeta, write_nifti_like
from medseg.utils import atomic_path, atomic_write_json, atomic_write_text, csv_text, display_row

logger = logging.getLogger(__name__)

#: Columns of ``predictions.csv`` in this order; any other keys of the rows follow, sorted.
FIELDS = [
    "case_id",
    "source",
    "input_type",
    "series_number",
    "status",
    "error",
    "slices",
    "height",
    "width",
    "foreground_pixels",
    "foreground_fraction",
    "slices_with_foreground",
    "foreground_mm2",
    "foreground_ml",
    "mask",
    "seg",
    "label",
    "class",
]

#: Series number given to a DICOM SEG: this plus the source's SeriesNumber (or this alone).
SEG_SERIES_NUMBER_OFFSET = 1000

#: Patient and study attributes a DICOM SEG keeps from its source: the Type 1/2/1C/2C attributes
#: of the Patient module (PS3.3 C.7.1.1) and the Type 1/2 attributes of the General Study module
#: (C.7.2.1), the two patient/study modules the SEG IOD makes mandatory.
SEG_IDENTITY = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAlternativeCalendar",
        "PatientSpeciesDescription",
        "PatientSpeciesCodeSequence",
        "PatientBreedDescription",
        "PatientBreedCodeSequence",
        "BreedRegistrationSequence",
        "ResponsiblePerson",
        "ResponsiblePersonRole",
        "ResponsibleOrganization",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    }
)

#: Optional patient and study attributes that highdicom copies and medseg removes again (used
#: when highdicom's own table of the standard's modules cannot be read).
_SEG_OPTIONAL_IDENTITY = frozenset(
    {
        "AdditionalPatientHistory",
        "AdmissionID",
        "AdmittingDiagnosesDescription",
        "Allergies",
        "ClinicalTrialSponsorName",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSiteName",
        "ConsultingPhysicianName",
        "EthnicGroup",
        "IssuerOfPatientID",
        "MedicalAlerts",
        "NameOfPhysiciansReadingStudy",
        "Occupation",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAge",
        "PatientBirthTime",
        "PatientComments",
        "PatientSize",
        "PatientState",
        "PatientWeight",
        "PhysiciansOfRecord",
        "PregnancyStatus",
        "ReasonForVisit",
        "ReferencedPatientSequence",
        "ReferencedStudySequence",
        "RequestingService",
        "ServiceEpisodeID",
        "SmokingStatus",
        "StudyDescription",
    }
)


#: zlib level of the PNGs medseg writes: 1 encodes an LGG overlay in 5.5 ms instead of 14.8 ms
#: (Pillow's default 6) for a file 12% larger; encoding was the largest cost of a streamed
#: predict after the model (docs/performance.md).
PNG_COMPRESS_LEVEL = 1


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 HxW or HxWx3 array as PNG (zlib level :data:`PNG_COMPRESS_LEVEL`),
    atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        PILImage.fromarray(np.ascontiguousarray(array)).save(
            tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
    return path


def write_mask_png(path: str | Path, mask: np.ndarray, binary: bool) -> Path:
    """Write a 2D mask: binary masks as 0/255, label maps as their labels (uint8)."""
    mask = np.asarray(mask)
    if binary:
        return write_png(path, ((mask > 0) * 255).astype(np.uint8))
    if mask.size and int(mask.max()) > 255:
        raise ValueError(f"{path}: label {int(mask.max())} does not fit an 8-bit PNG")
    return write_png(path, mask.astype(np.uint8))


def write_mask_nifti(
    path: str | Path, labels: np.ndarray, meta: ImageMeta, *, continuous: bool = False
) -> str:
    """Write a DxHxW label volume (or, ``continuous``, a float32 map such as an uncertainty
    map) as NIfTI in the source geometry; return how it was placed.

    * NIfTI source: its own voxel order and affine (:func:`medseg.io.write_nifti_like`);
    * DICOM series (or multi-frame file) with a known affine: voxel order (col, row, slice) and
      the series' affine converted to RAS (:func:`medseg.io.write_nifti_like`);
    * otherwise (multi-page TIFF, a series ordered by InstanceNumber): the same voxel order
      with a diagonal affine from the spacing (1 mm when unknown) and a warning in the log.

    Returns:
        ``"source"`` when the source geometry was used, ``"spacing-only"`` otherwise.
    """
    path = Path(path)
    if continuous:
        labels = np.asarray(labels, np.float32)
    else:
        labels = np.asarray(labels).astype(np.uint8 if _fits_uint8(labels) else np.int16)
    if "nifti_original_affine" in meta.extra or meta.affine is not None:
        write_nifti_like(path, labels, meta, continuous=continuous)
        return "source"
    import nibabel as nib

    spacing = meta.spacing if meta.spacing and len(meta.spacing) == 3 else (1.0, 1.0, 1.0)
    data = np.transpose(labels, (2, 1, 0))  # (slice, row, col) -> (col, row, slice)
    affine = np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    logger.warning(
        "%s: the source has no position in space; mask written with voxel spacing only", path
    )
    return "spacing-only"


def write_seg(
    path: str | Path,
    labels: np.ndarray,
    source_files: Sequence[str | Path],
    *,
    segment_names: dict[int, str] | None = None,
    series_number: int | None = None,
) -> Path:
    """Write a DICOM SEG (BINARY) for ``labels`` on the source series, atomically.

    Args:
        path: Output file (``seg.dcm``).
        labels: DxHxW integer label volume; slice ``i`` lies on ``source_files[i]`` (the sorted
            file list of :func:`medseg.io.read_dicom_series`, ``meta.source``).
        source_files: The source DICOM files, in the slice order of ``labels``; their headers
            are read with pydicom (no pixel data).
        segment_names: Label -> segment label. Default ``{1: "tumour"}``; labels above 0 that
            are missing get ``"label <k>"``.
        series_number: SeriesNumber of the source, to derive the SEG's
            (:data:`SEG_SERIES_NUMBER_OFFSET` + it).

    Frames whose slice has no foreground are left out (highdicom ``omit_empty_frames``); an
    all-empty mask is written with every frame empty. Each frame references its source SOP
    instance, and ``ReferencedSeriesSequence`` lists every source instance.

    Raises:
        ValueError: ``labels`` does not fit the source files (count or size).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3 or len(labels) != len(source_files):
        raise ValueError(
            f"{path}: labels of shape {labels.shape} do not fit {len(source_files)} source files"
        )
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    for source in sources:
        _add_missing_type2(source)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape[1:] != (rows, cols):
        raise ValueError(
            f"{path}: labels of slice size {labels.shape[1:]} do not fit the source's {rows}x{cols}"
        )
    names = dict(segment_names or {}) or {1: "tumour"}
    numbers = sorted({int(v) for v in np.unique(labels) if v > 0} | set(names))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=medseg.__version__,
    )
    descriptions = []
    for number in numbers:
        name = names.get(number, f"label {number}")
        tumour = name.lower() in ("tumour", "tumor")
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure
                if tumour
                else codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Neoplasm if tumour else codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if len(numbers) != max(numbers):  # highdicom wants segments 1..n
        raise ValueError(f"{path}: segment numbers {numbers} must run from 1 without gaps")
    pixels = labels.astype(np.uint8 if max(numbers) <= 255 else np.uint16)
    with warnings.catch_warnings():
        # highdicom warns about unusual PatientName values by quoting them: keep names out of
        # the logs (the SEG itself must carry the source's patient module).
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*exceeds the maximum length.*")
        seg = _segmentation(hd, sources, pixels, descriptions, series_number)
    _keep_required_identity(seg)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # the source's values are kept as they are, even when longer than their VR allows
        warnings.filterwarnings("ignore", message=".*exceeds the maximum length.*")
        seg.save_as(tmp)
    return path


def _segmentation(hd, sources, pixels, descriptions, series_number):
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER_OFFSET + int(series_number or 0),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=medseg.__version__,
        device_serial_number="0",
        series_description="medseg segmentation",
        content_label="MEDSEG",
        content_description="Automatic segmentation by medseg",
        omit_empty_frames=bool(pixels.any()),  # all empty: keep every frame, quietly
    )


#: Type 2 patient and study attributes (present, possibly empty) that a SEG copies from its
#: source; highdicom refuses a source that lacks one of them, as real anonymised series do.
_TYPE2_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _add_missing_type2(source) -> None:
    """Give the in-memory header of a source file the Type 2 patient/study attributes it lacks,
    empty (as the standard allows), so that its SEG can carry them; files are not changed."""
    for keyword in _TYPE2_IDENTITY:
        if keyword not in source:
            setattr(source, keyword, "")


def _patient_study_keywords() -> set[str]:
    """Keywords of every root attribute of the patient and study modules of the standard."""
    keywords = set(_SEG_OPTIONAL_IDENTITY)
    try:  # highdicom's table of the standard (a private module: a fallback list above)
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map

        attributes = get_module_attribute_map()
        modules = {
            m["key"]
            for iod in get_iod_module_map().values()
            for m in iod
            if m["ie"] in ("Patient", "Study")
        }
        for module in modules:
            keywords.update(a["keyword"] for a in attributes[module] if not a["path"])
    except Exception as e:  # pragma: no cover - depends on highdicom's internals
        logger.debug("highdicom's module table unavailable (%s); using medseg's list", e)
    return keywords


def _keep_required_identity(seg) -> None:
    """Remove from a SEG the patient/study attributes beyond :data:`SEG_IDENTITY`, and the
    source's acquisition equipment (see the module docstring)."""
    for keyword in sorted(_patient_study_keywords() - SEG_IDENTITY):
        if keyword in seg:
            delattr(seg, keyword)
    equipment = seg.get("ContributingEquipmentSequence")
    if equipment is not None:
        kept = [item for item in equipment if not _is_acquisition_equipment(item)]
        if kept:
            seg.ContributingEquipmentSequence = kept
        else:
            del seg.ContributingEquipmentSequence


def _is_acquisition_equipment(item) -> bool:
    purpose = item.get("PurposeOfReferenceCodeSequence") or []
    return any(code.get("CodeValue") == "109101" for code in purpose)  # DCM "Acquisition Equipment"


def write_tables(out: str | Path, rows: list[dict]) -> list[dict]:
    """Write ``predictions.csv`` (columns :data:`FIELDS`, then others) and ``predictions.json``.

    Text is written as :func:`medseg.utils.display_text` shows it (a file name that is not valid
    UTF-8 has its undecodable bytes as backslash escapes, ``scan_\\xff.png``), and the CSV's text
    cells that a spreadsheet would read as a formula start with a single quote
    (:func:`medseg.utils.spreadsheet_safe`; the JSON keeps them as they are).

    Returns:
        The rows as written (text through :func:`~medseg.utils.display_text`).

    Raises:
        OutputError: ``out`` cannot be written (full disk, read-only, no permission).
    """
    out = Path(out)
    rows = [display_row(r) for r in rows]
    fields = FIELDS + sorted({k for r in rows for k in r if k not in FIELDS})
    atomic_write_text(out / "predictions.csv", csv_text(fields, rows, extrasaction="ignore"))
    atomic_write_json(out / "predictions.json", rows)
    return rows


def _fits_uint8(labels: np.ndarray) -> bool:
    return labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) <= 255)
