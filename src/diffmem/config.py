"""Settings checked in one place: frozen dataclasses whose fields carry their option name and allowed range.

A method's settings (a detector's, a mitigation's, a run's) are one `Config` subclass. Building it checks every
field once (type, range, finiteness, choices) and then the class's own `check` (budgets across fields); the error
names the option and what it allows, on one line. What is built is passed on typed, never checked again.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(Config):
    ...     generations: int = setting(1, option="--generations", ge=1, le=64)
    >>> Demo(generations=4).generations
    4
    >>> Demo(generations=0)
    Traceback (most recent call last):
    diffmem.errors.InputError: --generations must be a whole number from 1 to 64, not 0
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from diffmem.errors import InputError

C = TypeVar("C", bound="Config")

MAX_SEED = 2**63 - 1
"""Seeds are non-negative 63-bit integers (torch generators take 64 bits; seed + generation must still fit)."""
MAX_GENERATIONS = 10_000
"""Most generations (initial noises) per prompt: Carlini et al. use 500, detection papers 1 to 32."""
MAX_STEPS = 1000
"""Longest sampling schedule: the training schedule of every supported model has 1000 timesteps."""


@dataclass(frozen=True)
class Rule:
    """What one setting allows: its option name, bounds, finiteness and choices."""

    option: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    choices: tuple[Any, ...] | None = None
    help: str = ""
    says: str = ""
    """The allowed values in the method's own words (e.g. "above 1 (classifier-free guidance)"), said instead of
    the generated description; an infinite value of a finite setting is told "finite and ..."."""

    def describe(self, kind: type) -> str:
        """The allowed values in words, e.g. "a whole number from 1 to 64"."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        noun = {int: "a whole number", float: "a finite number" if self.finite else "a number",
                str: "text", bool: "true or false"}.get(kind, kind.__name__)
        low = (f"from {_fmt(self.ge)}" if self.ge is not None else f"above {_fmt(self.gt)}" if self.gt is not None
               else "")
        high = (f"to {_fmt(self.le)}" if self.le is not None else f"below {_fmt(self.lt)}" if self.lt is not None
                else "")
        if low.startswith("above") and high:
            high = "and " + high
        return " ".join(part for part in (noun, low, high) if part)

    def check(self, value: Any, kind: type, optional: bool) -> Any:
        """`value` converted to `kind` (an int is a float too), or one InputError line naming the option."""
        if value is None and optional:
            return None
        allowed = self.says or self.describe(kind)
        if self.says and self.finite and isinstance(value, float) and math.isinf(value):
            allowed = "finite and " + allowed
        fail = InputError(f"{self.option} must be {allowed}{', or left out' if optional else ''}, not {_show(value)}")
        if kind is bool:
            if not isinstance(value, bool):
                raise fail
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's bool is no Real
                raise fail
            if not isinstance(value, int | float):  # a numpy (or other) scalar: the same number, as Python's
                value = int(value) if isinstance(value, numbers.Integral) else float(value)
            if kind is int:
                if isinstance(value, float):
                    if not value.is_integer():
                        raise fail
                    value = int(value)
            else:
                value = float(value)
                if math.isnan(value) or (self.finite and math.isinf(value)):
                    raise fail
            bounds = ((self.ge, lambda v, b: v >= b), (self.gt, lambda v, b: v > b), (self.le, lambda v, b: v <= b),
                      (self.lt, lambda v, b: v < b))
            if not all(bound is None or ok(value, bound) for bound, ok in bounds):
                raise fail
        elif kind is str and not isinstance(value, str):
            raise fail
        if self.choices is not None and value not in self.choices:
            raise fail
        return value


def setting(default: Any = dataclasses.MISSING, *, option: str, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, finite: bool = True,
            choices: tuple[Any, ...] | None = None, help: str = "", says: str = "") -> Any:
    """A checked dataclass field: its default, its option name (for errors and the CLI) and its allowed range
    (`says`: the range in the method's own words, for its error line)."""
    rule = Rule(option, ge, gt, le, lt, finite, choices, help, says)
    return dataclasses.field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class Config:
    """The base of every settings class: fields declared with `setting(...)` are checked when it is built."""

    budget: ClassVar[dict[str, int]] = {}
    """Size budgets across fields, e.g. {"generations*batch_size": 4096}: their product may not exceed the value."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))  # type: ignore[arg-type]  # a class is hashable
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is None:
                continue
            kind, optional = _kind(hints[f.name])
            if kind is None:  # a union such as str | int: the class's `check` reads it
                continue
            object.__setattr__(self, f.name, rule.check(getattr(self, f.name), kind, optional))
        for names, limit in self.budget.items():
            product = math.prod(int(getattr(self, name)) for name in names.split("*"))
            if product > limit:
                options = " x ".join(self.rule(name).option for name in names.split("*"))
                raise InputError(f"{options} is {product}, over the budget of {limit}: lower one of them")
        self.check()

    def check(self) -> None:
        """Checks across fields, once every field is in range (override; raise InputError)."""

    @classmethod
    def rule(cls, name: str) -> Rule:
        """The rule of field `name`."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get("rule") or Rule("--" + name.replace("_", "-"))
        raise KeyError(name)

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """`value` checked (and converted) by the rule of field `name` alone, as building the class would."""
        kind, optional = _kind(_hints(cls)[name])  # type: ignore[arg-type]  # a class is hashable
        return value if kind is None else cls.rule(name).check(value, kind, optional)

    @classmethod
    def names(cls) -> frozenset[str]:
        """The settings this class declares."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls: type[C], values: Mapping[str, Any], *, strict: bool = False, **fixed: Any) -> C:
        """Build from a mapping of user values, taking the fields this class declares (None keeps a default).

        With `strict`, a value given (not None) for a setting this class does not declare is an error naming it.
        """
        names = cls.names()
        if strict:
            foreign = sorted(k for k, v in values.items() if v is not None and k not in names and k not in fixed)
            if foreign:
                shown = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
                raise InputError(f"{shown} {'does' if len(foreign) == 1 else 'do'} not apply here")
        given = {k: v for k, v in values.items() if k in names and v is not None}
        return cls(**{**given, **fixed})

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (what result rows record)."""
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)


def redefault(owner: type[Config], name: str, default: Any) -> Any:
    """Setting `name` of `owner` (its option and range) with another default: for a class that reuses another's
    setting, so the rule is declared once."""
    for f in dataclasses.fields(owner):
        if f.name == name:
            return dataclasses.field(default=default, metadata=f.metadata)
    raise KeyError(name)


def config_of(owner: type, config: Config | None, settings: Mapping[str, Any]) -> Any:
    """A method's settings: `config` (default: its class `owner.Config` built from `settings`) with `settings` on
    top, checked as built; a config of another class is a TypeError (a caller's bug, not a user's value)."""
    kind: type[Config] = owner.Config  # type: ignore[attr-defined]
    if config is None:
        config = kind(**settings)
    elif settings:
        config = config.replace(**settings)
    if not isinstance(config, kind):
        raise TypeError(f"{owner.__name__} takes a {kind.__name__}, not {type(config).__name__}")
    return config


def generations_setting(default: int = 1, least: int = 1, why: str = "") -> Any:
    """The `--generations` setting of a method that needs at least `least` of them (`why`: the reason, said in
    its error line)."""
    reason = f" ({why})" if why else ""
    return setting(default, option="--generations", ge=least, le=MAX_GENERATIONS,
                   says=f"at least {least} and at most {MAX_GENERATIONS}{reason}")


@dataclass(frozen=True)
class SamplingConfig(Config):
    """What fixes the initial noises and schedule of a run: generation g of every prompt starts from seed + g."""

    generations: int = generations_setting()
    seed: int = setting(0, option="--seed", ge=0, le=MAX_SEED)
    num_inference_steps: int = setting(50, option="--num-inference-steps", ge=1, le=MAX_STEPS)

    def check(self) -> None:
        if self.seed + self.generations - 1 > MAX_SEED:
            raise InputError(f"--seed {self.seed} + --generations {self.generations} passes the largest seed "
                             f"{MAX_SEED}: lower --seed")


def and_join(names: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field annotations resolved (each class of the hierarchy in its own module's names)."""
    return typing.get_type_hints(cls)


def _kind(hint: Any) -> tuple[type | None, bool]:
    """The one plain type of a field hint and whether None is allowed (None for a union of several types)."""
    if isinstance(hint, type) and hint in (int, float, str, bool):
        return hint, False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) == 1 and args[0] in (int, float, str, bool):
            return args[0], optional
    return None, False


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
