"""Reading a config: YAML files, ``--set`` overrides and nested dicts, each key checked against
its field's type.

YAML is read by :func:`safe_load_bounded`: PyYAML's safe loader (no code, no Python objects),
after a check of the composed document that refuses one expanding to more than
:data:`MAX_YAML_NODES` values or :data:`MAX_YAML_CHARS` characters of text once its aliases are
followed (a "billion laughs" alias bomb is a few hundred bytes that expand to 10^9 values), or
holding an alias to itself. A config holds a few hundred values, so the limits never refuse a
real one. Error messages quote values through :func:`medseg.config.checks.excerpt` (at most
200 characters).
"""

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

from medseg.config.checks import excerpt, validate
from medseg.config.sections import SECTIONS, Config
from medseg.errors import ConfigError

#: The most values (YAML nodes, counted with aliases followed) a config may expand to.
MAX_YAML_NODES = 100_000
#: The most characters of text (scalars, counted with aliases followed) a config may expand to.
MAX_YAML_CHARS = 10_000_000


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a composed YAML document that would expand past the limits, before it is built.

    Counts every node once per place it appears (aliases followed), memoised per node, so the
    count takes time proportional to the file, not to its expansion.
    """
    sizes: dict[int, tuple[int, int]] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            ancestors.discard(key)
            count, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            for child in _children(node):
                count, chars = count + sizes[id(child)][0], chars + sizes[id(child)][1]
            sizes[key] = (count, chars)
            if count > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
                raise ConfigError(
                    f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values or "
                    f"{MAX_YAML_CHARS:,} characters once its aliases (*name) are followed; a "
                    "medseg config holds a few hundred values, so it was refused before "
                    "expanding it"
                )
            continue
        if key in sizes:
            continue
        ancestors.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in ancestors:
                raise ConfigError(
                    f"{source}: the YAML holds an alias to itself (a recursive *name), which no "
                    "config value can be"
                )
            if id(child) not in sizes:
                stack.append((child, False))


def safe_load_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` that refuses documents expanding past :data:`MAX_YAML_NODES`
    values or :data:`MAX_YAML_CHARS` characters, or holding a recursive alias, before building
    them.

    Args:
        text: the YAML text.
        source: what to name in errors (the file, or ``--set KEY``).

    Raises:
        ConfigError: the document is too large once expanded or recursive, or nested too deeply.
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{source}: a value cannot be read ({excerpt(str(e))})") from None
    finally:
        loader.dispose()


def _short(text: Any, limit: int = 80) -> str:
    """``str(text)``, cut to ``limit`` characters with ``...`` (keys and ``--set`` texts)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert the safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{key}: expected a list of {_type_name(item_tp)}, got {excerpt(value)}"
            )
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
        raise ConfigError(errors[0] if errors else f"{key}: bad value {excerpt(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {excerpt(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {excerpt(value)}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no decimal point) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {excerpt(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {excerpt(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {excerpt(value)}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {excerpt(raw)}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean '{name}.{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown key '{name}.{_short(key)}'; {hint}valid keys in '{name}': "
                f"{', '.join(valid)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any] | None, source: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source or 'config'}: expected a mapping of sections, got {excerpt(raw)}"
        )
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown section '{_short(name)}'{f' in {source}' if source else ''}; "
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
        raise ConfigError(
            f"--set {_short(text)!r}: expected section.key=value, e.g. train.epochs=5"
        )
    try:
        parsed = safe_load_bounded(value, f"--set {_short(key)}") if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {_short(text)!r}: value is not valid YAML ({_yaml_problem(e)})"
        ) from None
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
            raw = safe_load_bounded(p.read_text(encoding="utf-8"), str(p)) or {}
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
                f"--set {_short(text)!r}: unknown section '{_short(section)}'; "
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
