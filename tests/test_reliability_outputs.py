"""Outputs from the wild (issue 30): spreadsheet-safe CSV tables, an output folder that is (or
lies inside) an input folder, and output locations that cannot be written (read-only, no
permission): one line naming the path and exit 2, before any work where it can be checked.

Root reads and writes whatever the permissions say: the ``chmod`` tests then skip, and the same
refusals are checked by emulating the denial (``os.access``, ``os.replace``), where ``setpriv``
is installed by running the check as the unprivileged user ``nobody``, and where ``mount`` is
allowed on a real tmpfs remounted read-only (before the batch, and in the middle of it)."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.errors import ConfigError, OutputError
from medseg.evaluation.evaluate import read_cases, write_cases
from medseg.inference.predict import predict
from medseg.io.writers import write_tables
from medseg.utils import (
    check_outside_inputs,
    csv_text,
    display_text,
    spreadsheet_safe,
    spreadsheet_unquote,
)
from tests.conftest import REPO, run_cli
from tests.inference.test_predict import IntensityModel

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: File names that a spreadsheet would run as formulas (OWASP's examples).
FORMULA_NAMES = ("=cmd|' -C calc'!A0.png", '=HYPERLINK("x")evil.png', "@SUM(1+1).png")


def png(path: Path) -> Path:
    img = np.full((24, 24), 20, np.uint8)
    img[4:12, 4:12] = 250
    PILImage.fromarray(img).save(path, format="PNG")
    return path


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def unsafe(cell: str) -> bool:
    """Would a spreadsheet read this CSV cell as a formula?"""
    return cell.startswith(("=", "+", "-", "@", "\t", "\r"))


# --------------------------------------------------------------------------- spreadsheet safety


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("-0.5", "-0.5"),  # text that is a plain number stays a number
        ("+3", "+3"),
        ("a=b", "a=b"),
        ("", ""),
        (-0.5, -0.5),
        (3, 3),
        (None, None),
    ],
)
def test_spreadsheet_safe(value, expected):
    assert spreadsheet_safe(value) == expected
    assert spreadsheet_unquote(spreadsheet_safe(value)) == value


def test_display_text_escapes_undecodable_bytes():
    assert display_text(os.fsdecode(b"scan_\xff\xfe.png")) == "scan_\\xff\\xfe.png"
    assert display_text("über.png") == "über.png"
    assert display_text("x\ud800") == "x\\ud800"  # a lone surrogate of no file name
    assert display_text("a\nb\r") == "a\\x0ab\\x0d"  # no forged log or table lines


def test_csv_writers_neutralise_formulas_and_keep_numbers(tmp_path):
    rows = [
        {"case_id": "a", "source": FORMULA_NAMES[0], "status": "ok", "foreground_fraction": -0.5},
        {"case_id": "b", "source": "-1+1", "status": "ok", "foreground_fraction": 0.25},
    ]
    write_tables(tmp_path, rows)
    written = csv_rows(tmp_path / "predictions.csv")
    assert [r["source"] for r in written] == ["'" + FORMULA_NAMES[0], "'-1+1"]
    assert [r["foreground_fraction"] for r in written] == ["-0.5", "0.25"]
    assert not any(unsafe(c) for r in written for k, c in r.items() if k != "foreground_fraction")
    json_text = (tmp_path / "predictions.json").read_text()
    assert FORMULA_NAMES[0].replace('"', '\\"') in json_text  # JSON keeps the real name

    cases = [{"id": "=evil()", "group": "@g", "dice": -0.25, "=col": "+x"}]
    write_cases(tmp_path / "cases.csv", cases)
    raw = csv_rows(tmp_path / "cases.csv")
    assert raw == [{"id": "'=evil()", "group": "'@g", "dice": "-0.25", "'=col": "'+x"}]
    assert read_cases(tmp_path / "cases.csv") == [
        {"id": "=evil()", "group": "@g", "dice": "-0.25", "=col": "+x"}
    ]
    assert csv_text(["a"], [{"a": "+1-cmd"}]) == "a\r\n'+1-cmd\r\n"
    assert csv_text(["a"], [{"a": "\t=1"}]) == "a\r\n\\x09=1\r\n"  # control: escaped


def test_predict_neutralises_formula_file_names(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in (*FORMULA_NAMES, "-dash.png"):
        png(inp / name)
    monkeypatch.chdir(inp)  # relative inputs: the source cell starts with the file name
    names = sorted(p.name for p in inp.iterdir())
    predict(IntensityModel(level=100.0), names, tmp_path / "out", progress=False)
    rows = csv_rows(tmp_path / "out" / "predictions.csv")
    assert sorted(r["source"] for r in rows) == sorted("'" + n if unsafe(n) else n for n in names)
    assert not any(unsafe(cell) for row in rows for cell in row.values())
    assert {r["case_id"] for r in rows} == {"cmd_-C_calc_A0", "HYPERLINK_x_evil", "SUM_1_1", "dash"}
    for row in rows:  # ids are folder names: no leading dash either
        assert (tmp_path / "out" / row["case_id"] / "mask.png").is_file()


# --------------------------------------------------------------------------- out vs. inputs


def test_out_must_lie_outside_the_inputs(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    png(inp / "a.png")
    model = IntensityModel()
    with pytest.raises(ConfigError) as e:
        predict(model, [inp], inp, overwrite=True, progress=False)
    assert str(e.value) == (
        f"{inp}: the output folder is the input folder {inp}; its outputs would mix with the "
        "inputs (and a rerun would read them as inputs): choose an output folder outside the "
        "inputs"
    )
    with pytest.raises(ConfigError, match=r"preds: the output folder lies inside the input folder"):
        predict(model, [inp], inp / "preds", overwrite=True, progress=False)
    with pytest.raises(ConfigError, match=r": the output folder holds the input .*a\.png"):
        predict(model, [inp / "a.png"], tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in inp.iterdir()) == ["a.png"]  # nothing written
    check_outside_inputs(tmp_path / "out", [inp, None, inp / "a.png"])  # apart: fine


@pytest.mark.slow
def test_cli_out_in_the_input_folder_is_refused_and_reruns_do_not_grow(tiny_unet_run, tmp_path):
    """Issue 30: with --overwrite each rerun into the input folder predicted the previous
    run's masks and overlays as new cases (2 cases became 6)."""
    inp = tmp_path / "in"
    inp.mkdir()
    png(inp / "a.png")
    png(inp / "b.png")
    for out in ("in", "in/preds"):
        for _ in range(2):
            proc = run_cli(
                "predict", "--model", str(tiny_unet_run), "in", "--out", out, "--overwrite",
                "--no-progress", cwd=tmp_path,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error:")]
            assert line.startswith(f"medseg: error: {out}: the output folder ")
            assert "choose an output folder outside the inputs" in line
    assert sorted(p.name for p in inp.iterdir()) == ["a.png", "b.png"]
    # Outputs of an earlier run inside an input folder are not read as inputs.
    first = run_cli(
        "predict", "--model", str(tiny_unet_run), "in", "--out", "old", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    shutil.move(tmp_path / "old", inp / "old")
    proc = run_cli(
        "predict", "--model", str(tiny_unet_run), "in", "--out", "new", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "in/old: a medseg prediction output folder; not read as input" in proc.stderr
    assert sorted(r["case_id"] for r in csv_rows(tmp_path / "new" / "predictions.csv")) == [
        "a",
        "b",
    ]


# --------------------------------------------------------------------------- read-only outputs


@pytest.fixture
def locked(tmp_path):
    """A folder (``ro``) that may be read but not written; permissions restored afterwards."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


def _deny_writes_to(monkeypatch, folder: Path) -> None:
    """Emulate, for root, a folder this user may not write: ``os.access`` says no."""
    real = os.access

    def access(path, mode, *a, **k):
        where = Path(path).resolve()
        if mode & os.W_OK and folder.resolve() in (where, *where.parents):
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_any_work(locked, tmp_path):
    png(tmp_path / "a.png")
    with pytest.raises(OutputError, match=rf"^{locked}: cannot write there \(permission denied\)"):
        predict(IntensityModel(), [tmp_path / "a.png"], locked, overwrite=True, progress=False)
    with pytest.raises(OutputError, match=rf"^{locked}/out: cannot create the output folder: "):
        predict(IntensityModel(), [tmp_path / "a.png"], locked / "out", progress=False)


def test_unwritable_out_is_refused_before_any_work_emulated(tmp_path, monkeypatch):
    png(tmp_path / "a.png")
    (tmp_path / "ro").mkdir()
    _deny_writes_to(monkeypatch, tmp_path / "ro")
    model = IntensityModel()
    with pytest.raises(OutputError) as e:
        predict(model, [tmp_path / "a.png"], tmp_path / "ro" / "out", progress=False)
    assert str(e.value) == (
        f"{tmp_path / 'ro' / 'out'}: cannot create the output folder: {tmp_path / 'ro'} may not "
        "be written (permission denied); choose another output folder"
    )
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.skipif(
    not (IS_ROOT and shutil.which("setpriv")), reason="needs root and setpriv to drop to nobody"
)
def test_permission_checks_as_an_unprivileged_user(tmp_path):
    """The real permission checks (``os.access``, ``mkstemp``) as the user ``nobody``."""
    base = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        script = (
            "import sys; from medseg.utils import check_writable, atomic_write_text\n"
            "from medseg.errors import OutputError\n"
            "for call in (lambda: check_writable(sys.argv[1]),\n"
            "             lambda: check_writable(sys.argv[1] + '/new/deeper'),\n"
            "             lambda: atomic_write_text(sys.argv[1] + '/t.csv', 'x')):\n"
            "    try: call()\n"
            "    except OutputError as e: print(e)\n"
        )
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [sys.executable, "-c", script, str(ro)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            f"{ro}: cannot write there (permission denied); choose another output folder or "
            "make this one writable, then run the same command again",
            f"{ro}/new/deeper: cannot create the output folder: {ro} may not be written "
            "(permission denied); choose another output folder",
            f"{ro}/t.csv: cannot write there (permission denied); choose another output "
            "folder or make this one writable, then run the same command again",
        ]
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_disk_at_write_time_names_the_file(tmp_path, monkeypatch):
    png(tmp_path / "a.png")
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "predictions.csv":
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        predict(IntensityModel(level=100.0), [tmp_path / "a.png"], out, progress=False)
    assert str(e.value) == (
        f"{out / 'predictions.csv'}: cannot write there (read-only file system); choose another "
        "output folder or make this one writable, then run the same command again"
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".predictions")]  # no temp left
    monkeypatch.setattr(os, "replace", real)  # the disk is writable again: the batch resumes
    result = predict(IntensityModel(level=100.0), [tmp_path / "a.png"], out, progress=False)
    assert [r["status"] for r in result.rows] == ["ok"]


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (needs root and mount permission; the test is skipped otherwise), to be
    made read-only with :func:`remount`: a real ``EROFS``, which root cannot write either."""
    where = tmp_path / "disk"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def test_a_read_only_file_system_is_refused_before_any_work(tmpfs, tmp_path):
    png(tmp_path / "a.png")
    (tmpfs / "old").mkdir()
    remount(tmpfs, "ro")
    for out, message in [
        (tmpfs, f"{tmpfs}: cannot write there (read-only file system)"),
        (tmpfs / "old", f"{tmpfs / 'old'}: cannot write there (read-only file system)"),
        (tmpfs / "new", f"{tmpfs / 'new'}: cannot create the output folder: {tmpfs} may not "),
    ]:
        with pytest.raises(OutputError) as e:
            predict(IntensityModel(), [tmp_path / "a.png"], out, overwrite=True, progress=False)
        assert str(e.value).startswith(message), str(e.value)


def test_a_disk_that_turns_read_only_mid_batch_names_the_folder(tmpfs, tmp_path, monkeypatch):
    from medseg.inference import stream

    for name in ("a", "b", "c"):
        png(tmp_path / f"{name}.png")
    finish_case, calls = stream.finish_case, []

    def then_read_only(*a, **k):
        if calls:
            remount(tmpfs, "ro")
        calls.append(1)
        return finish_case(*a, **k)

    monkeypatch.setattr(stream, "finish_case", then_read_only)
    inputs = [tmp_path / f"{n}.png" for n in ("a", "b", "c")]
    out = tmpfs / "preds"
    with pytest.raises(OutputError) as e:
        predict(IntensityModel(level=100.0), inputs, out, progress=False)
    assert str(e.value).startswith(f"{out}: cannot write there (read-only file system)")
    remount(tmpfs, "rw")  # writable again: the same call finishes, the first case not redone
    redone: list[str] = []

    def counted(prepared, *a, **k):
        redone.append(prepared.case.case_id)
        return finish_case(prepared, *a, **k)

    monkeypatch.setattr(stream, "finish_case", counted)
    result = predict(IntensityModel(level=100.0), inputs, out, progress=False)
    assert [r["status"] for r in result.rows] == ["ok"] * 3
    assert redone == ["b", "c"]


@pytest.mark.slow
def test_cli_unwritable_out_exits_2_with_one_line(tiny_unet_run, tmp_path, monkeypatch):
    png(tmp_path / "a.png")
    (tmp_path / "ro").mkdir()
    if IS_ROOT:
        _deny_writes_to(monkeypatch, tmp_path / "ro")
    else:
        (tmp_path / "ro").chmod(0o555)
    try:
        proc = run_cli(
            "predict", "--model", str(tiny_unet_run), "a.png", "--out", "ro/preds",
            "--no-progress", cwd=tmp_path,
        )  # fmt: skip
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error:")]
    # (the CLI's --out lock may meet the folder first: its line names the folder too)
    assert line.startswith("medseg: error: ro/preds") and "ermission denied" in line, line
    assert list((tmp_path / "ro").iterdir()) == []
