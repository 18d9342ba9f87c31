"""Atomic writes and safe names."""

from __future__ import annotations

import pytest

from medseg.utils import atomic_path, atomic_write_json, atomic_write_text, safe_name


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_text(target, '{"x": 2}\n')
    assert target.read_text() == '{"x": 2}\n'
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_atomic_path_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


@pytest.mark.parametrize(
    "text", ["../../etc/passwd", "a/b\\c", "..", "", "x" * 500, "Müller^Hans 1.2.840"]
)
def test_safe_name_is_a_plain_bounded_file_name(text):
    name = safe_name(text)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(name) <= 64
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_safe_name_keeps_long_names_distinct():
    assert safe_name("a" * 100 + "1") != safe_name("a" * 100 + "2")
