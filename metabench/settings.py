"""Learner settings checked from their declarations.

A learner's ``Config`` dataclass declares what each setting accepts where it declares its default::

    @dataclass
    class Config:
        meta_steps: int = setting(1000, min=0)                   # an integer >= 0
        lr: float = setting(1e-3, min=0, min_exclusive=True)     # a number > 0
        optimizer: str = setting("adam", choices=("adam", "sgd"))
        first_order: bool = False                                # a plain field: its type is checked

:class:`metabench.Learner` calls :func:`check_settings` on a dataclass config when a learner is
built, so every learner (third-party ones too) refuses a bad value the same way: a ``ValueError``
of one line naming the learner, the setting, the value and what is accepted, which the harness
reports as bad input (exit status 2). Checks that involve more than one field, or values resolved
later (0 = "the problem type's default"), stay in the learner.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

#: The training budgets every learner defines (smoke: seconds, for tests; quick: a few minutes on a
#: 2-core CPU; paper: the published training length).
BUDGETS = ("smoke", "quick", "paper")

#: The task ``metabench run`` and ``metabench sweep`` use when none is named: fine-grained 5-way
#: 1-shot on hand-drawn kanji (issue 17: kanji-5w1s, the default before, left < 1 point of headroom).
DEFAULT_TASK = "kanji_hand_radical-5w1s"

#: The training precisions ``--precision`` accepts (fp32, the default: no autocast; bf16: the training
#: forward and backward under ``torch.autocast(dtype=torch.bfloat16)``, where the learner allows it;
#: metabench/numerics.py). Here, not there, so that reading a result needs no torch.
PRECISIONS = ("fp32", "bf16")

__all__ = ["setting", "check_settings"]

_KEY = "metabench"  # the dataclasses field-metadata key of a setting's constraints
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def setting(default: Any, *, min: float | None = None, max: float | None = None,
            choices: Iterable[Any] | None = None, min_exclusive: bool = False) -> Any:
    """A Config field with ``default`` and the values :func:`check_settings` accepts.

    min, max:      inclusive bounds (``min_exclusive=True``: the value must be above ``min``)
    choices:       the accepted values (e.g. ``("", "adam", "sgd")``; list a "use the default"
                   value such as ``""`` too)

    The field's annotation gives its type (bool, int, float or str); int fields refuse bools and
    float fields accept ints. Returns ``dataclasses.field(default=default, metadata=...)``.
    """
    constraints = {"min": min, "max": max, "choices": None if choices is None else tuple(choices),
                   "min_exclusive": bool(min_exclusive)}
    return dataclasses.field(default=default, metadata={_KEY: constraints})


def check_settings(learner_name: str, config: Any) -> None:
    """Raise ValueError unless every field of the dataclass instance ``config`` is a value its
    declaration accepts: its annotated type, then the bounds and choices of :func:`setting`."""
    kinds = _field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        accepted = _refusal(value, kinds.get(f.name), f.metadata.get(_KEY, {}))
        if accepted:
            raise ValueError(f"{learner_name}: {f.name} must be {accepted}, got {value!r}")


def _field_types(config_cls: type) -> dict[str, Any]:
    """Field name -> annotated type (string annotations resolved; unresolvable ones left out)."""
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation that does not resolve: use the plain names only
        return {f.name: _TYPES.get(f.type, f.type) if isinstance(f.type, str) else f.type
                for f in dataclasses.fields(config_cls)}


def _refusal(value: Any, kind: Any, spec: dict[str, Any]) -> str | None:
    """What the setting accepts, if ``value`` is not one of them; None if it is."""
    choices = spec.get("choices")
    if choices is not None:
        ok = any(value == c and type(value) is type(c) for c in choices)
        return None if ok else "one of " + ", ".join(_show(c) for c in choices)
    low, high, exclusive = spec.get("min"), spec.get("max"), spec.get("min_exclusive", False)
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    bounds = [f"{'>' if exclusive else '>='} {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    what = {int: "an integer", float: "a number"}.get(kind, "a value")
    accepted = " ".join([what, " and ".join(bounds)]) if bounds else what
    numeric = {int: int, float: (int, float)}.get(kind)
    if numeric and (isinstance(value, bool) or not isinstance(value, numeric)):
        return accepted
    try:  # written so that NaN is outside any bound
        inside = ((low is None or (value > low if exclusive else value >= low))
                  and (high is None or value <= high))
    except TypeError:  # not comparable with the bounds
        inside = False
    return None if inside else accepted


def _show(choice: Any) -> str:
    return choice if isinstance(choice, str) and choice else repr(choice)
