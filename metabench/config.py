"""Run configuration: a learner's defaults, then its budget, then a TOML file, then ``--set``.

TOML layout::

    [run]       # defaults for CLI options: task, backbone, seed, budget, episodes, device, eval_batch, precision
    seed = 1
    [learner]   # the learner's hyper-parameters (fields of its Config dataclass)
    inner_lr = 0.4
    [backbone]  # options of the backbone factory
    width = 32
    [data]      # per-data-set folders (override --data-root / $METABENCH_DATA)
    miniimagenet = "/data/mini-imagenet"

``--set key=value`` sets a learner hyper-parameter; ``--set backbone.key=value`` a backbone option.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
import tomllib
import typing
from pathlib import Path
from typing import Any

from .errors import MetabenchError

RUN_KEYS = ("task", "backbone", "seed", "budget", "episodes", "device", "out", "data_root", "checkpoint_every",
            "eval_batch", "precision")
#: the type of each [run] value (as TOML gives it; checkpoint_every: a step count or text like "10m")
_RUN_TYPES = {"seed": (int,), "episodes": (int,), "checkpoint_every": (int, str), "eval_batch": (int,)}
_TOP_KEYS = ("run", "learner", "backbone", "data", "validation")


def read_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config file; a missing file, bad TOML or an unknown table is a MetabenchError."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetabenchError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetabenchError(f"--config {path}: cannot read: {exc}") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, a number of over 4300 digits, nested too deeply
        raise MetabenchError(f"--config {path}: invalid TOML: {exc}") from None
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        raise MetabenchError(f"--config {path}: unknown entry {', '.join(map(repr, unknown))}; "
                             f"accepted tables: [{'], ['.join(_TOP_KEYS)}]")
    for key in doc:
        if not isinstance(doc[key], dict):
            raise MetabenchError(f"--config {path}: {key!r} must be a table ([{key}]), got {type(doc[key]).__name__}")
    bad_run = [k for k in doc.get("run", {}) if k not in RUN_KEYS]
    if bad_run:
        raise MetabenchError(f"--config {path}: unknown [run] key {', '.join(map(repr, bad_run))}; "
                             f"accepted: {', '.join(RUN_KEYS)}")
    for key, value in doc.get("run", {}).items():
        kinds = _RUN_TYPES.get(key, (str,))
        if not isinstance(value, kinds) or isinstance(value, bool):
            accepted = " or ".join({int: "an integer", str: "text"}[k] for k in kinds)
            raise MetabenchError(f"--config {path}: [run] {key} must be {accepted}, got {value!r}")
        if isinstance(value, str) and "\x00" in value:  # no name or path holds one (a command-line value cannot)
            raise MetabenchError(f"--config {path}: [run] {key} must be text without a NUL character, got {value!r}")
    return doc


def parse_set(pairs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``--set`` pairs into (learner overrides, backbone overrides), values still text."""
    learner, backbone = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MetabenchError(f"--set {pair!r}: expected key=value (e.g. --set inner_lr=0.1 or --set backbone.width=32)")
        if key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value.strip()
        else:
            learner[key] = value.strip()
    return learner, backbone


def _field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, type(f.default)) for f in dataclasses.fields(config_cls)}


def coerce(value: Any, kind: Any, what: str) -> Any:
    """``value`` (text from --set, or a TOML value) as ``kind`` (bool, int, float or str); a float must be
    finite (the result file records every setting, and JSON holds no NaN or infinity)."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise MetabenchError(f"{what}: expected true or false, got {value!r}")
        try:
            value = int(text) if kind is int else float(text) if kind is float else value
        except ValueError:
            raise MetabenchError(f"{what}: expected {kind.__name__}, got {value!r}") from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > sys.float_info.max:
            raise MetabenchError(f"{what}: expected float, got an integer too large for a float")
        value = float(value)
    if kind in (bool, int, float, str) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise MetabenchError(f"{what}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise MetabenchError(f"{what}: expected a finite float, got {value!r}")
    return value


def build_config(config_cls: type, layers: list[tuple[str, dict[str, Any]]], learner_name: str) -> Any:
    """An instance of ``config_cls`` with each (source, overrides) layer applied in order."""
    types = _field_types(config_cls)
    values: dict[str, Any] = {}
    for source, overrides in layers:
        for key, value in overrides.items():
            if key not in types:
                raise MetabenchError(f"{source}: learner {learner_name!r} has no setting {key!r}; "
                                     f"accepted: {', '.join(types)}")
            values[key] = coerce(value, types[key], f"{source}: {key}")
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as exc:
        raise MetabenchError(f"learner {learner_name!r} config: {exc}") from None


def coerce_backbone_options(overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Text values from --set typed like the factory's defaults (int/float/bool), else left as given."""
    out = {}
    for key, value in overrides.items():
        default = defaults.get(key)
        kind = type(default) if isinstance(default, (bool, int, float, str)) else None
        out[key] = coerce(value, kind, f"backbone.{key}") if kind else value
    return out


def resolve_problem_defaults(config: Any, defaults: Mapping[str, Any]) -> None:
    """Replace each field of ``config`` that is 0 (or "") by ``defaults[field]`` (in place)."""
    for name, value in defaults.items():
        if getattr(config, name) in (0, ""):
            setattr(config, name, value)
