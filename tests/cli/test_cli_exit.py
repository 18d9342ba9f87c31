"""Exit codes of ``medseg``: 2 for usage, config and input errors, 3 for internal errors, with and
without ``--debug`` (which adds the traceback and keeps the code)."""

from __future__ import annotations

import pytest

from medseg.cli import main
from medseg.cli.commands import COMMANDS, EXIT_INTERNAL, EXIT_USAGE
from medseg.errors import ConfigError

# The `data` verb runs without importing TensorFlow: these tests stay fast.
ARGS = ["data", "synth", "--out", "unused"]


def _raise(error: Exception):
    def command(args) -> int:
        raise error

    return command


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_exits_3(monkeypatch, capsys, debug):
    monkeypatch.setitem(COMMANDS, "data", _raise(RuntimeError("boom")))
    code = main((["--debug"] if debug else []) + ARGS)
    err = capsys.readouterr().err
    assert code == EXIT_INTERNAL == 3
    assert "medseg: internal error: RuntimeError: boom" in err
    assert ("Traceback (most recent call last)" in err) == debug
    assert ("rerun with --debug" in err) == (not debug)


@pytest.mark.parametrize("debug", [False, True])
def test_a_medseg_error_exits_2(monkeypatch, capsys, debug):
    monkeypatch.setitem(COMMANDS, "data", _raise(ConfigError("train.epochs: must be >= 1")))
    code = main((["--debug"] if debug else []) + ARGS)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE == 2
    assert "medseg: error: train.epochs: must be >= 1" in err
    assert ("Traceback (most recent call last)" in err) == debug


@pytest.mark.parametrize("debug", [False, True])
def test_a_missing_config_file_exits_2(tmp_path, capsys, debug):
    missing = tmp_path / "nope.yaml"
    code = main((["--debug"] if debug else []) + ["data", "audit", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"medseg: error: {missing}: config file not found" in err
    assert ("Traceback (most recent call last)" in err) == debug
