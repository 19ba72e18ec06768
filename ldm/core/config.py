"""YAML configs -> frozen dataclasses, with dotted ``--set`` overrides and strict checking.

Every phase describes its config as a frozen dataclass (nested dataclasses for sections). The
loader rejects unknown keys (with the closest valid key as a hint) and values of the wrong type,
naming the file and the dotted key; relative paths are resolved against the repository root.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ldm.core.errors import ConfigError, UserError

T = TypeVar("T")


def _find_root() -> Path:
    """Where the default configs/ live: LDM_ROOT, the current folder if it has configs/, else
    the checkout the package sits in (an editable install)."""
    env = os.environ.get("LDM_ROOT")
    if env:
        return Path(env).resolve()
    if (Path.cwd() / "configs").is_dir():
        return Path.cwd().resolve()
    here = Path(__file__).resolve().parents[2]  # ldm/core/config.py -> the checkout
    return here if (here / "configs").is_dir() else Path.cwd().resolve()


REPO_ROOT: Path = _find_root()


def resolve_path(p: str | Path) -> Path:
    """A path from a config: absolute as given, relative ones against the current folder
    (like every command-line tool), never against where the package is installed."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML; None = defaults), apply ``key.sub=value`` overrides, build ``cls``."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if path.is_dir():
            raise ConfigError(
                f"{path} is a folder, not a config file; pass --config with a YAML file "
                f"(configs/<profile>/<phase>.yaml)"
            )
        if not path.is_file():
            raise ConfigError(
                f"config file not found: {path} (pass --config with an existing YAML)"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not a YAML text file (byte {e.start} is not UTF-8 text); pass --config "
                f"with a YAML config such as configs/<profile>/<phase>.yaml"
            ) from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
            raise ConfigError(f"{path}: not valid YAML{at}: {why}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for item in overrides or []:
        _apply_override(data, item, cls)
    return _build(cls, data, where, "")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build ``cls`` from a plain dict (e.g. a checkpoint's model_config) with the same checks."""
    return _build(cls, data, where, "")


def _apply_override(data: dict[str, Any], item: str, cls: type) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(valid)})"


def _build(cls: type[T], data: Any, where: str, prefix: str, base: Any = None) -> T:
    """``cls`` from ``data``; keys ``data`` lacks come from ``base`` (the enclosing config's
    default for this section, e.g. train_vae_pair's own TrainConfig) or ``cls``'s defaults."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: key '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(
                f"{where}: unknown key '{prefix}{name}'{_closest(str(name), list(fields))}"
            )
        section = _section_default(fields[name], hints[name], base)
        if section is not None and isinstance(value, dict):
            kwargs[name] = _build(hints[name], value, where, f"{prefix}{name}.", section)
        else:
            kwargs[name] = _coerce(value, hints[name], where, f"{prefix}{name}")
    for name, f in fields.items():
        if name in kwargs:
            continue
        if base is not None:
            value = getattr(base, name)
            kwargs[name] = resolve_path(value) if isinstance(value, Path) else value
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix}{name}'")
        if isinstance(f.default, Path):  # defaults resolve like values from the file
            kwargs[name] = resolve_path(f.default)
    try:
        return cls(**kwargs)
    except UserError as e:
        raise ConfigError(f"{where}: {_with_prefix(str(e), prefix)}") from None


def _section_default(f: dataclasses.Field, hint: Any, base: Any) -> Any:
    """The default instance of a nested config section (None when the field is not one)."""
    if not dataclasses.is_dataclass(hint):
        return None
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory not in (dataclasses.MISSING, hint):  # a phase's own defaults
        return f.default_factory()
    return None  # the section's class defaults (and its presets, e.g. degrade.preset) apply


def _with_prefix(message: str, prefix: str) -> str:
    """'steps must be ..' -> 'train.steps must be ..'; a message that already names its section
    ('train.steps ..', 'raw.dtype: ..') is not prefixed twice."""
    if not prefix:
        return message
    section = prefix.rstrip(".").split(".")[-1] + "."
    if message.startswith(section):
        message = message[len(section) :]
    return prefix + message


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int->float, str->Path, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{where}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where, key)
            except ConfigError:
                continue
        fail()
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{where}: key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where, f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{where}: key '{key}' expects {len(args)} values, got {len(value)}: {value!r}"
                )
            items = [
                _coerce(v, a, where, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads '1e-3' (no dot) as a string
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return resolve_path(value)
        fail()
    raise TypeError(f"unsupported config annotation {tp!r} for key {key}")


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready structure of a config (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) so a run's outputs say how they were made."""
    from ldm.core.files import atomic_write_text

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(path), text)
