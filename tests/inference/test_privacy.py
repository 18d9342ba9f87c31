"""Privacy: DICOM patient and study data (PatientID, PatientName, dates, ...) never reaches file
names, tables or logs unless ``--keep-identifiers``; hostile PatientIDs ('../../etc/passwd', 10 000
characters) write nothing outside ``--out``; the DICOM SEG carries only the patient and study
attributes the standard requires."""

from __future__ import annotations

import copy
import csv
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.inference.cases import collect_cases
from medseg.io.writers import SEG_IDENTITY, write_seg
from tests.conftest import run_cli

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

TRAVERSAL_ID = "../../etc/passwd"
LONG_ID = "../../../" + "P" * 10_000
SERIES_NAME = "Doe^Jane^Marie"
CT_NAME = "Mustermann^Max"
DATES = {
    "PatientBirthDate": "19230815",
    "StudyDate": "20010911",
    "SeriesDate": "20010912",
    "AcquisitionDate": "20010913",
    "ContentDate": "20010914",
}
OPTIONAL = {  # identifying attributes that no output may carry, the SEG included
    "PatientComments": "Allergic to penicillin",
    "PatientAge": "077Y",
    "InstitutionName": "St Elsewhere Hospital",
    "StudyDescription": "Follow-up Lumbago",
    "OtherPatientIDs": "OTHER-998877",
}
REQUIRED = {"AccessionNumber": "ACC55443", "ReferringPhysicianName": "Feelgood^Doctor"}
# Nothing but the SEG may hold these, in any form (case-insensitive).
SECRETS = [
    "passwd",
    "P" * 40,
    "Jane",
    "Doe^",
    "Mustermann",
    "ACC55443",
    "Feelgood",
    *DATES.values(),
    *OPTIONAL.values(),
]
# Not even the SEG may hold these.
SEG_FORBIDDEN = [*OPTIONAL.values(), DATES["SeriesDate"], DATES["AcquisitionDate"]]
SEG_FORBIDDEN.append(DATES["ContentDate"])


def _hostile(ds: pydicom.Dataset, patient_id: str, name: str) -> pydicom.Dataset:
    ds.PatientID, ds.PatientName = patient_id, name
    for keyword, value in {**DATES, **OPTIONAL, **REQUIRED}.items():
        setattr(ds, keyword, value)
    return ds


def hostile_inputs(root: Path) -> dict[str, Path]:
    """A 4-slice MR series (PatientID '../../etc/passwd') and a CT file (10 000-character
    PatientID), copied from pydicom's bundled files, with names, dates and other identifiers."""
    mr = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    study = root / "study"
    study.mkdir(parents=True)
    uid = generate_uid()
    for k in range(4):
        ds = _hostile(copy.deepcopy(mr), TRAVERSAL_ID, SERIES_NAME)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid, 3, k + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.save_as(study / f"im{k}.dcm")
    ct = _hostile(pydicom.dcmread(TEST_FILES / "CT_small.dcm"), LONG_ID, CT_NAME)
    ct.save_as(root / "ct.dcm")
    return {"study": study, "ct": root / "ct.dcm"}


def _contains_secret(text: str, secrets=SECRETS) -> list[str]:
    low = text.lower()
    return [s for s in secrets if s.lower() in low]


def _file_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("latin-1")


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def _seg_elements(ds: pydicom.Dataset):
    """Every element of ``ds``, those inside sequences too."""
    yield from ds.iterall()


# --------------------------------------------------------------------------- library level


def test_case_ids_never_come_from_patient_tags_unless_asked(tmp_path):
    inputs = hostile_inputs(tmp_path)
    cases = collect_cases([inputs["study"], inputs["ct"]])
    assert [c.case_id for c in cases] == ["study_3", "ct"]
    assert all(c.identifiers is None for c in cases)

    kept = collect_cases([inputs["study"], inputs["ct"]], keep_identifiers=True)
    ids = [c.case_id for c in kept]
    assert ids[0] == "etc_passwd_study_3"
    assert ids[1].startswith("PPPP") and len(ids[1]) <= 64
    for case_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", case_id) and not case_id.startswith(".")
    assert kept[1].identifiers == {
        "patient_id": LONG_ID,
        "patient_name": CT_NAME,
        "study_date": DATES["StudyDate"],
    }


def test_dicom_seg_keeps_only_the_patient_and_study_attributes_the_standard_requires(tmp_path):
    inputs = hostile_inputs(tmp_path)
    files = sorted(inputs["study"].glob("*.dcm"))
    labels = np.zeros((4, 64, 64), np.uint8)
    labels[1, 10:20, 10:20] = 1
    write_seg(tmp_path / "seg.dcm", labels, files)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    # required (Patient and General Study modules), with the source's values
    assert seg.PatientID == TRAVERSAL_ID and str(seg.PatientName) == SERIES_NAME
    assert seg.PatientBirthDate == DATES["PatientBirthDate"]
    assert seg.StudyDate == DATES["StudyDate"]
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    for keyword, value in REQUIRED.items():
        assert str(seg.get(keyword)) == value
    # nothing optional
    for keyword in OPTIONAL:
        assert keyword not in seg
    keywords = {e.keyword for e in _seg_elements(seg)}
    assert "InstitutionName" not in keywords and "PatientAge" not in keywords
    assert not _contains_secret(_file_text(tmp_path / "seg.dcm"), SEG_FORBIDDEN)
    patient_keywords = {
        k for k in (e.keyword for e in seg) if k.startswith("Patient") or k.startswith("Study")
    }
    assert patient_keywords <= SEG_IDENTITY


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def tiny_run(tiny_unet_run) -> Path:
    """The session's tiny U-Net run folder (tests/conftest.py)."""
    return tiny_unet_run


@pytest.mark.slow
def test_predict_writes_no_identifiers_outside_the_seg_and_nothing_outside_out(tiny_run, tmp_path):
    inputs = hostile_inputs(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    before = _snapshot(tmp_path, out)
    args = ["predict", "--model", str(tiny_run), str(inputs["study"]), str(inputs["ct"])]
    proc = run_cli(*args, "--out", str(out), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # nothing written outside --out (also not at ../../etc/passwd relative to it)
    assert _snapshot(tmp_path, out) == before
    assert not (out.parent.parent / "etc").exists() and not (work / "etc").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    for p in files:
        assert p.resolve().is_relative_to(out.resolve())
    assert sorted(p.name for p in out.iterdir()) == [
        "ct",
        "predictions.csv",
        "predictions.json",
        "study_3",
    ]

    # no identifier in names, tables, logs, or any output but the SEG
    assert not _contains_secret(proc.stdout + proc.stderr)
    for p in files:
        assert not _contains_secret(p.relative_to(out).as_posix()), p
        if p.name != "seg.dcm":
            assert not _contains_secret(_file_text(p)), p
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert {r["case_id"] for r in rows} == {"study_3", "ct"}
    assert all(r["status"] == "ok" for r in rows)
    assert not [k for k in rows[0] if k.startswith("patient")]

    # the SEG: the source's patient/study identity as the standard requires, nothing more
    seg = pydicom.dcmread(out / "study_3" / "seg.dcm")
    assert seg.PatientID == TRAVERSAL_ID and str(seg.PatientName) == SERIES_NAME
    assert not _contains_secret(_file_text(out / "study_3" / "seg.dcm"), SEG_FORBIDDEN)
    assert {e.keyword for e in seg if e.keyword.startswith("Patient")} <= SEG_IDENTITY


@pytest.mark.slow
def test_keep_identifiers_names_cases_after_the_patient_still_path_safe(tiny_run, tmp_path):
    inputs = hostile_inputs(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    before = _snapshot(tmp_path, out)
    args = ["predict", "--model", str(tiny_run), str(inputs["study"]), str(inputs["ct"])]
    proc = run_cli(*args, "--out", str(out), "--keep-identifiers", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(tmp_path, out) == before
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names[1] == "etc_passwd_study_3" and names[0].startswith("PPPP")
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) and not name.startswith(".")
    rows = {r["case_id"]: r for r in json.loads((out / "predictions.json").read_text())}
    assert rows["etc_passwd_study_3"]["patient_id"] == TRAVERSAL_ID
    assert rows["etc_passwd_study_3"]["patient_name"] == SERIES_NAME
    assert rows[names[0]]["patient_id"] == LONG_ID
    assert rows[names[0]]["study_date"] == DATES["StudyDate"]
    # what --keep-identifiers does not bring: the other identifiers stay out
    assert not _contains_secret(
        (out / "predictions.csv").read_text(), [*OPTIONAL.values(), DATES["PatientBirthDate"]]
    )
    shutil.rmtree(out)
