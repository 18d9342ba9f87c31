"""Tests for medseg.config: shipped configs, defaults, --set overrides, validation, hashing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import medseg.config.precision as precision_module
from medseg.config import (
    SECTIONS,
    Config,
    DataConfig,
    TrainConfig,
    config_from_dict,
    cpu_has_amx,
    load_config,
    precision_policy,
)
from medseg.errors import ConfigError

REPO = Path(__file__).parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------
# Loading


def test_configs_folder_is_not_empty():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == str(path)
    # Every value the file sets reaches the config.
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.source == ""
    assert cfg.train.epochs == TrainConfig().epochs
    assert cfg.data.image_size == DataConfig().image_size


def test_missing_file_names_it(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_bad_yaml_file_names_it(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


def test_top_level_list_is_rejected(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


def test_section_not_a_mapping_in_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [1]\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(path)


def test_override_into_section_that_is_not_a_mapping(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [1]\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(path, ["train.epochs=3"])


def test_empty_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path).to_dict() == Config().to_dict()


def test_overrides_apply_on_top_of_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\n  batch_size: 2\n")
    cfg = load_config(path, overrides=["train.epochs=7"])
    assert cfg.train.epochs == 7
    assert cfg.train.batch_size == 2


# ---------------------------------------------------------------------------------------------
# --set overrides: type conversion


def test_override_int():
    cfg = load_config(None, ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert type(cfg.train.epochs) is int


def test_override_float_from_int():
    cfg = load_config(None, ["train.learning_rate=1"])
    assert cfg.train.learning_rate == 1.0
    assert type(cfg.train.learning_rate) is float


def test_override_float_decimal():
    cfg = load_config(None, ["train.learning_rate=0.0005"])
    assert cfg.train.learning_rate == pytest.approx(5e-4)


def test_override_float_scientific_notation():
    cfg = load_config(None, ["train.learning_rate=1e-4"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False)])
def test_override_bool(text: str, expected: bool):
    cfg = load_config(None, [f"data.strict={text}"])
    assert cfg.data.strict is expected


def test_override_list():
    cfg = load_config(None, ["data.image_size=[64,64]"])
    assert cfg.data.image_size == [64, 64]
    assert all(type(v) is int for v in cfg.data.image_size)


def test_override_string():
    cfg = load_config(None, ["run.name=my-run"])
    assert cfg.run.name == "my-run"


def test_later_override_wins():
    cfg = load_config(None, ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5


@pytest.mark.parametrize("text", ["train.epochs", "epochs=3", "a.b.c=1", ".epochs=3"])
def test_malformed_override(text: str):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [text])


# ---------------------------------------------------------------------------------------------
# Unknown sections and keys


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trian.epochs=3"])
    msg = str(e.value)
    assert "trian" in msg
    for name in SECTIONS:
        assert name in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg
    for f in dataclasses.fields(TrainConfig):
        assert f.name in msg


def test_unknown_section_in_file_names_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  name: unet\n")
    with pytest.raises(ConfigError, match="models") as e:
        load_config(path)
    assert "c.yaml" in str(e.value)


def test_unknown_key_in_dict():
    with pytest.raises(ConfigError, match=r"model\.filters") as e:
        config_from_dict({"model": {"filters": 3}})
    assert "base_filters" in str(e.value)


def test_section_not_a_mapping():
    with pytest.raises(ConfigError, match="train"):
        config_from_dict({"train": [1, 2]})


# ---------------------------------------------------------------------------------------------
# Wrong types and impossible values


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.learning_rate=fast", "train.learning_rate"),
        ("data.strict=1", "data.strict"),
        ("data.image_size=64", "data.image_size"),
        ("data.image_size=[64,x]", "data.image_size"),
        ("run.name=3", "run.name"),
    ],
)
def test_wrong_type_names_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=-1", "train.epochs"),
        ("cv.folds=1", "cv.folds"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("predict.threshold=0", "predict.threshold"),
        ("predict.threshold=1", "predict.threshold"),
        ("model.upsampling=foo", "model.upsampling"),
        ("data.image_size=[7,7]", "data.image_size"),
        ("data.image_size=[64,64,3]", "data.image_size"),
        ("run.name=a/b", "run.name"),
        ("run.name=..", "run.name"),
        ("data.channels=2", "data.channels"),
        ("train.optimizer=adamax", "train.optimizer"),
        ("train.warmup_epochs=10", "train.warmup_epochs"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("augment.missing_sequence=-0.1", "augment.missing_sequence"),
        ("model.depth=0", "model.depth"),
        ("cv.only=[6]", "cv.only"),
        ("train.validation_freq=0", "train.validation_freq"),
    ],
)
def test_impossible_value_names_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("extra", [["augment.reference_channel=3"], ["data.channels=1"]])
def test_missing_sequence_needs_a_reference_among_several_channels(extra: list[str]):
    with pytest.raises(ConfigError, match=r"augment\.reference_channel"):
        load_config(None, ["augment.missing_sequence=0.5", *extra])
    # Without the augmentation the same values are not checked.
    load_config(None, extra)


def test_choice_error_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.upsampling=foo"])
    assert "transpose" in str(e.value) and "resize" in str(e.value)


def test_task_layout_mismatch():
    with pytest.raises(ConfigError, match=r"data\.layout"):
        load_config(None, ["data.task=classification"])
    cfg = load_config(None, ["data.task=classification", "data.layout=class_folders"])
    assert cfg.data.layout == "class_folders"


def test_boundary_values_are_accepted():
    cfg = load_config(
        None, ["cv.folds=2", "data.image_size=[8,8]", "train.epochs=1", "data.val_fraction=0.5"]
    )
    assert (cfg.cv.folds, cfg.data.image_size, cfg.train.epochs) == (2, [8, 8], 1)


# ---------------------------------------------------------------------------------------------
# YAML round trip and hash


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.epochs=3", "data.image_size=[64,32]", "cv.only=[1,2]", "train.warmup_epochs=1"],
        ["data.task=classification", "data.layout=class_folders", "run.name=x"],
    ],
)
def test_to_yaml_round_trip(overrides: list[str]):
    cfg = load_config(None, overrides)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.hash() == cfg.hash()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_round_trip(path: Path):
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()), source=cfg.source)
    assert again == cfg


def test_to_dict_has_every_section_and_no_source():
    d = Config().to_dict()
    assert set(d) == set(SECTIONS)
    assert "source" not in d


def test_hash_changes_with_a_value():
    base = load_config(None)
    assert load_config(None, ["train.epochs=11"]).hash() != base.hash()
    assert load_config(None, ["data.image_size=[64,64]"]).hash() != base.hash()
    assert load_config(None, ["model.l2=0.001"]).hash() != base.hash()


def test_hash_is_stable():
    assert (
        load_config(None, ["train.epochs=3"]).hash() == load_config(None, ["train.epochs=3"]).hash()
    )


def test_hash_ignores_run_section():
    base = load_config(None)
    other = load_config(None, ["run.name=other", "run.root=elsewhere", "run.overwrite=true"])
    assert other.hash() == base.hash()
    assert other != base


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("false", "float32"),
        ("true", "mixed_float16"),
        ("float32", "float32"),
        ("mixed_float16", "mixed_float16"),
        ("mixed_bfloat16", "mixed_bfloat16"),
    ],
)
def test_mixed_precision_names_a_keras_policy(text: str, policy: str):
    cfg = load_config(None, [f"train.mixed_precision={text}"])
    assert precision_policy(cfg.train) == policy


@pytest.mark.parametrize(
    ("amx", "gpu", "policy"),
    [(True, False, "mixed_bfloat16"), (False, False, "float32"), (True, True, "float32")],
)
def test_auto_precision_is_bfloat16_only_on_a_cpu_with_amx(monkeypatch, amx, gpu, policy):
    monkeypatch.setattr(precision_module, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(precision_module, "_gpu_visible", lambda: gpu)
    cfg = load_config(None, ["train.mixed_precision=auto"])
    assert precision_policy(cfg.train) == policy


def test_cpu_has_amx_reads_the_flags_of_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert not cpu_has_amx(info)  # AVX512-BF16 is not AMX
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_amx(info)
    assert not cpu_has_amx(tmp_path / "missing")


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="train.mixed_precision: 'bfloat16' is not one of .*"):
        load_config(None, ["train.mixed_precision=bfloat16"])
