"""Bounded config errors: alias bombs are refused before they are expanded, and every quoted
value is an excerpt of at most ~200 characters."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from medseg.config import load_config
from medseg.config.checks import EXCERPT_CHARS, excerpt
from medseg.config.loading import MAX_YAML_NODES, safe_load_bounded
from medseg.errors import ConfigError


def _bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs" document: ``width ** levels`` integers as ``data.image_size``."""
    lines = ["anchors:", "  l0: &a0 [" + ", ".join(["8"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join([*lines, "data:", f"  image_size: *a{levels - 1}", ""])


def _bounded(call):
    """Run ``call``; return its ConfigError's message, the seconds and the peak of memory
    allocated meanwhile (bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as e:
            call()
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(e.value), seconds, peak


def test_an_alias_bomb_in_a_config_file_is_refused_before_it_is_expanded(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())  # 10^9 values once expanded (the 722 MB line, 3.7 GB)
    message, seconds, peak = _bounded(lambda: load_config(path))
    assert message.startswith(f"{path}: the YAML expands to more than {MAX_YAML_NODES:,} values")
    assert "refused before expanding it" in message and "\n" not in message
    assert len(message) < 400
    assert seconds < 0.5, seconds
    assert peak < 20 * 2**20, peak  # 20 MiB


def test_an_alias_bomb_given_with_set_is_refused_too():
    small = load_config(None, ["data.image_size=[&a 64, *a]"])  # an alias, not a bomb
    assert small.data.image_size == [64, 64]
    levels = "&a0 [8, 8, 8, 8, 8, 8, 8, 8, 8, 8]"
    for i in range(1, 7):
        levels = f"&a{i} [{levels}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"
    message, seconds, _ = _bounded(lambda: load_config(None, [f"data.image_size={levels}"]))
    assert message.startswith("--set data.image_size: the YAML expands to more than")
    assert seconds < 0.5


def test_a_recursive_alias_and_deep_nesting_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set data.window: the YAML holds an alias to "):
        load_config(None, ["data.window=&a [1, *a]"])
    path = tmp_path / "deep.yaml"
    path.write_text("data:\n  window: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: the YAML is nested too deeply$"):
        load_config(path)


def test_configs_with_small_anchors_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "data:\n  image_size: &size [64, 64]\n  task: segmentation\n"
        "train:\n  patch_size: *size\n  epochs: 3\n"
    )
    cfg = load_config(path)
    assert cfg.data.image_size == [64, 64] and cfg.train.patch_size == [64, 64]
    assert safe_load_bounded("", "x") is None
    assert safe_load_bounded("a: &x {b: 1}\nc: *x\n", "x") == {"a": {"b": 1}, "c": {"b": 1}}


def test_a_long_value_is_quoted_as_a_bounded_excerpt_with_its_type_and_length(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("data:\n  image_size: [" + ", ".join(["64"] * 20000) + "]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: data.image_size: expected [height, width], each >= 8")
    assert message.endswith(", ...] (a list of 20,000 items)") and len(message) < 400

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.task=" + "x" * 100_000])
    assert "... (a str of 100,000 characters) is not one of" in str(e.value)
    assert len(str(e.value)) < 400

    with pytest.raises(ConfigError) as e:  # a wrong type: a long list where a number goes
        load_config(None, ["train.epochs=[" + ",".join(["1"] * 50_000) + "]"])
    assert str(e.value).endswith("(a list of 50,000 items)") and len(str(e.value)) < 400

    with pytest.raises(ConfigError) as e:  # an unknown key of 10,000 characters
        load_config(None, [f"data.{'k' * 10_000}=1"])
    assert str(e.value).startswith("unknown key 'data.kkkk") and len(str(e.value)) < 500


def test_excerpt():
    assert excerpt([64, 64]) == "[64, 64]"
    assert excerpt("abc") == "'abc'"
    assert excerpt(list(range(1000))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...] (a list of 1,000 items)"
    nested = [[list(range(100))] * 100] * 100
    text = excerpt(nested)
    assert len(text) <= EXCERPT_CHARS + 40 and text.endswith("(a list of 100 items)")
    assert excerpt({"k": "v" * 500}).startswith("{'k': 'vvvv")
    assert len(excerpt({"k": "v" * 500})) < EXCERPT_CHARS + 40


def test_a_run_folder_config_bomb_is_refused_naming_the_file(tmp_path):
    from medseg.artifacts.runs import RunDir

    run = RunDir(Path(tmp_path))
    run.config_path.write_text(_bomb())
    with pytest.raises(ConfigError, match=rf"^{run.config_path}: the YAML expands to more than"):
        run.config()
