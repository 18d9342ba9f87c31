"""Inputs from the wild (issue 30): file names that are not UTF-8, symbolic links among the
inputs, and medseg's own outputs inside an input folder.

Case discovery is tested on :func:`collect_cases` directly; whole batches with the stand-in model
of ``test_predict`` (fast), and the slow tests through ``medseg predict`` with a trained tiny
U-Net, as a user runs it."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.errors import DataError
from medseg.inference import stream
from medseg.inference.cases import case_id_base, collect_cases
from medseg.inference.predict import predict
from tests.conftest import run_cli
from tests.inference.test_predict import IntensityModel

#: Two file names that are not valid UTF-8 and whose safe parts are the same (``scan``).
WILD = (b"scan_\xff\xfe.png", b"scan_\xfe\xff.png")


def png(path: Path | bytes, value: int = 20) -> Path | bytes:
    """A small grey PNG at ``path`` (a ``bytes`` path is written as these exact bytes)."""
    img = np.full((24, 24), value, np.uint8)
    img[4:12, 4:12] = 250
    with open(path, "wb") as f:
        PILImage.fromarray(img).save(f, format="PNG")
    return path


def wild_folder(root: Path) -> Path:
    """A folder with the two :data:`WILD` names and one plain name."""
    root.mkdir(parents=True, exist_ok=True)
    for name in WILD:
        png(os.fsencode(root) + b"/" + name)
    png(root / "plain.png")
    return root


def rows_of(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- file names


def test_names_that_are_not_utf8_get_distinct_stable_ids(tmp_path):
    folder = wild_folder(tmp_path / "in")
    cases = collect_cases([folder])
    ids = {os.fsencode(Path(c.source).name): c.case_id for c in cases}
    assert len(set(ids.values())) == 3
    assert ids[b"plain.png"] == "plain"
    for name in WILD:  # the safe part, then 8 hex digits of the name's bytes
        assert ids[name].startswith("scan_") and len(ids[name]) == len("scan_") + 8
        assert ids[name] == case_id_base(os.fsdecode(name[: -len(".png")]))
    # the same ids whatever else the folder holds (a rerun after a new file came)
    png(os.fsencode(folder) + b"/scan_\xfa.png")
    again = {os.fsencode(Path(c.source).name): c.case_id for c in collect_cases([folder])}
    assert {k: again[k] for k in ids} == ids
    assert case_id_base("a b") == "a_b"  # valid names keep their ids


def test_a_batch_with_wild_names_writes_its_tables(tmp_path):
    folder = wild_folder(tmp_path / "in")
    result = predict(IntensityModel(level=100.0), [folder], tmp_path / "out", progress=False)
    assert result.n_failed == 0 and len(result.rows) == 3
    rows = rows_of(tmp_path / "out")
    sources = sorted(r["source"] for r in rows)
    assert sources == sorted(
        [f"{folder}/scan_\\xff\\xfe.png", f"{folder}/scan_\\xfe\\xff.png", f"{folder}/plain.png"]
    )
    table = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    assert sorted(r["source"] for r in table) == sources
    assert sorted(r["source"] for r in result.rows) == sources  # what the CLI prints
    for row in rows:
        assert (tmp_path / "out" / row["mask"]).is_file()


@pytest.mark.slow
def test_cli_predict_a_wild_name_end_to_end_and_resume(tiny_unet_run, tmp_path, monkeypatch):
    folder = wild_folder(tmp_path / "in")
    args = ("predict", "--model", str(tiny_unet_run), str(folder), "--out", "preds")
    args += ("--no-overlays", "--no-progress")
    # The first run is stopped after its first case (as by Ctrl-C): the batch is unfinished.
    finish_case, calls = stream.finish_case, []

    def interrupted(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return finish_case(*a, **k)

    monkeypatch.setattr(stream, "finish_case", interrupted)
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 130, first.stderr
    assert not (tmp_path / "preds" / "predictions.csv").exists()
    monkeypatch.setattr(stream, "finish_case", finish_case)
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "continuing an interrupted prediction; 1 cases already done" in again.stderr
    assert "Traceback" not in again.stderr + first.stderr
    rows = rows_of(tmp_path / "preds")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert len({r["case_id"] for r in rows}) == 3
    assert {r["source"] for r in rows} >= {f"{folder}/scan_\\xff\\xfe.png"}
    for row in rows:
        assert (tmp_path / "preds" / row["mask"]).is_file()


# --------------------------------------------------------------------------- symbolic links


@pytest.fixture
def linked(tmp_path) -> dict[str, Path]:
    """Inputs ``in/`` with every kind of symbolic link; ``outside/`` is not an input."""
    inp, outside = tmp_path / "in", tmp_path / "outside"
    (inp / "sub").mkdir(parents=True)
    outside.mkdir()
    png(inp / "a.png")
    png(inp / "sub" / "b.png")
    png(tmp_path / "far.png")
    png(outside / "c.png")
    links = {
        "file_out": ("far.png", inp / "file_out.png"),  # followed: a case
        "folder_out": ("outside", inp / "folder_out"),  # followed: walked
        "file_dup": ("a.png", inp / "file_dup.png"),  # read by another path: refused
        "folder_dup": ("sub", inp / "folder_dup"),  # read by another path: refused
        "loop": (".", inp / "sub" / "loop"),  # the folder that holds the link: refused
        "self": ("self.png", inp / "self.png"),  # a link to itself: refused
        "dangling": ("missing.png", inp / "dangling.png"),  # refused
    }
    for target, link in links.values():
        outer = target in ("far.png", "outside")
        link.symlink_to(tmp_path / target if outer else target)
    return {name: link for name, (_, link) in links.items()} | {"in": inp, "outside": outside}


def test_every_symbolic_link_is_a_case_or_a_refusal_with_its_reason(linked, caplog):
    caplog.set_level(logging.INFO, logger="medseg.inference.cases")
    cases = {c.source: c for c in collect_cases([linked["in"]])}
    inp = linked["in"]
    assert cases[str(linked["file_out"])].kind == "file"
    assert cases[str(inp / "folder_out" / "c.png")].kind == "file"  # under the link's path
    refused = {
        "file_dup": r"symbolic link to .*a\.png, which this batch already reads by another path",
        "folder_dup": r"symbolic link to the folder .*sub, which this batch already reads",
        "loop": r"a link loop: the folder holds the link; not followed",
        "self": r"symbolic link loop",
        "dangling": r"dangling symbolic link: its target 'missing.png' does not exist",
    }
    for name, reason in refused.items():
        case = cases[str(linked[name])]
        assert case.kind == "error" and str(linked[name]) in case.error, case
        assert re.search(reason, case.error), case.error
    assert sorted(cases) == sorted(
        [str(inp / "a.png"), str(inp / "sub" / "b.png"), str(inp / "folder_out" / "c.png")]
        + [str(linked[n]) for n in ("file_out", *refused)]
    )
    logged = caplog.text
    assert f"{inp / 'folder_out'}: symbolic link to the folder {linked['outside']}" in logged
    assert "(outside the inputs): followed, 1 cases" in logged
    assert "1 symbolic links to files outside the inputs followed" in logged


def test_a_symbolic_link_given_by_name_is_followed_or_named(linked):
    [case] = collect_cases([linked["file_out"]])
    assert case.kind == "file" and case.source == str(linked["file_out"])
    with pytest.raises(DataError, match=r"dangling\.png: dangling symbolic link"):
        collect_cases([linked["dangling"]])


def test_a_batch_gives_each_link_a_row(linked, tmp_path):
    result = predict(IntensityModel(), [linked["in"]], tmp_path / "out", progress=False)
    by_source = {r["source"]: r for r in rows_of(tmp_path / "out")}
    assert len(by_source) == len(result.rows) == 9
    assert by_source[str(linked["file_out"])]["status"] == "ok"
    assert by_source[str(linked["loop"])]["status"] == "error"
    assert "a link loop" in by_source[str(linked["loop"])]["error"]
    assert result.n_failed == 5


# --------------------------------------------------------------------------- medseg's outputs


def test_prediction_outputs_inside_the_inputs_are_not_inputs(tmp_path, caplog):
    inp = tmp_path / "in"
    inp.mkdir()
    png(inp / "a.png")
    png(inp / "b.png")
    model = IntensityModel(level=100.0)
    predict(model, [inp / "a.png", inp / "b.png"], inp / "preds", progress=False)
    # an unfinished batch is recognised by its state folder, a finished one by its table
    (inp / "half").mkdir()
    png(inp / "half" / "mask.png")
    (inp / "half" / ".medseg-predict").mkdir()
    caplog.set_level(logging.INFO, logger="medseg.inference.cases")
    cases = collect_cases([inp])
    assert sorted(c.case_id for c in cases) == ["a", "b"]
    assert f"{inp / 'preds'}: a medseg prediction output folder; not read as input" in caplog.text
    assert f"{inp / 'half'}: a medseg prediction output folder" in caplog.text
    with pytest.raises(DataError, match=r"preds: is a medseg prediction output folder"):
        collect_cases([inp / "preds"])
    # a predictions.json of another tool does not hide a folder
    (inp / "other").mkdir()
    (inp / "other" / "predictions.json").write_text('{"scores": [1, 2]}')
    png(inp / "other" / "c.png")
    assert sorted(c.case_id for c in collect_cases([inp])) == ["a", "b", "c"]


def test_random_byte_names_give_unique_ids_and_utf8_tables(tmp_path):
    """A small fuzz: 60 names of random bytes (all but ``/`` and NUL) are all cases, with
    distinct file-name safe ids, and their tables are valid UTF-8 naming each one."""
    rng = np.random.default_rng(30)
    allowed = np.array([b for b in range(1, 256) if b != ord("/")], np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    names = set()
    while len(names) < 60:
        names.add(b"x" + rng.choice(allowed, int(rng.integers(1, 40))).tobytes() + b".png")
    for name in names:
        with open(os.fsencode(folder) + b"/" + name, "wb") as f:
            f.write(b"not read here")
    cases = collect_cases([folder])
    assert len(cases) == len(names)
    ids = [c.case_id for c in cases]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", i) and len(i) <= 73 for i in ids)
    from medseg.io.writers import write_tables

    write_tables(tmp_path, [{"case_id": c.case_id, "source": c.source} for c in cases])
    text = (tmp_path / "predictions.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    json.loads((tmp_path / "predictions.json").read_bytes().decode("utf-8"))
    assert "\\x" in text
