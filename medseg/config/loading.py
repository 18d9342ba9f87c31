"""Reading a config: YAML files, ``--set`` overrides and nested dicts, each key checked against
its field's type."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from medseg.config.checks import validate
from medseg.config.sections import SECTIONS, Config
from medseg.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert the safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no decimal point) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean '{name}.{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown key '{name}.{key}'; {hint}valid keys in '{name}': {', '.join(valid)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any] | None, source: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {raw!r}")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown section '{name}'{f' in {source}' if source else ''}; "
                f"{hint}valid sections: {', '.join(SECTIONS)}"
            )
        sections[name] = _build_section(name, SECTIONS[name], value)
    return validate(Config(**sections, source=source))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where it is (PyYAML's text spans lines)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into (``[section, key]``, parsed YAML value)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({_yaml_problem(e)})") from None
    return parts, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    Args:
        path: YAML file; its top level maps section names to keys.
        overrides: ``section.key=value`` strings applied after the file, in order.

    Returns:
        The validated config.

    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type or impossible value.
    """
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save "
                f"the config as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    overridden: set[str] = set()
    for text in overrides or []:
        (section, key), value = parse_override(text)
        overridden.add(f"{section}.{key}")
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {text!r}: unknown section '{section}'; "
                f"valid sections: {', '.join(SECTIONS)}"
            )
        sec = raw.get(section) or {}
        if not isinstance(sec, dict):
            raise ConfigError(
                f"{source or 'config'}: section '{section}' must be a mapping of keys"
            )
        sec[key] = value
        raw[section] = sec
    try:
        return config_from_dict(raw, source=source)
    except ConfigError as e:
        # Name the file too, unless the bad key came from --set or the message already does.
        message = str(e)
        from_set = any(message.startswith(k) or f"'{k}'" in message for k in overridden)
        if source and source not in message and not from_set:
            raise ConfigError(f"{source}: {message}") from None
        raise
