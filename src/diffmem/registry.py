"""Things known by name: models, such as `load_pipeline("testbed")`, and methods (`MethodRegistry`).

`loading` resolves a model name here without knowing who registered it (the package root registers the bundled
testbed, `diffmem.testbed.bundled`); a target is a callable or a `"module:function"` string imported on first use.
Detectors and mitigations register their classes in a `MethodRegistry` when the class is defined (their base
class's `__init_subclass__`), so a new method is one new module of its package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Generic, TypeVar

from diffmem.errors import InputError

T = TypeVar("T")

NOT_VERIFIED = "no figure verified here (see the paper)"
"""A method's `published` figure when none was checked against its paper."""
DEFAULT_MITIGATION = "embedding-delayed"
"""The mitigation the guard, the page and `generate` use unless told: the one that meets issue #32's target on testbed
v2 (docs/results.md, "A default that meets the target"); Wen et al.'s method stays available as `embedding`."""
DEFAULT_WITHOUT_CFG_BATCH = "embedding"
"""The default on a model whose guidance branches are two calls (Flux's true CFG): no CFG batch, no schedule to
delay, so Wen et al.'s method alone (`diffmem.mitigate.base.default_mitigation`)."""


@dataclass(frozen=True)
class NamedModel:
    """A diffusers pipeline folder, optionally with the UNet of another folder, and what to do if it is missing."""

    pipeline: Path
    unet: Path | None = None
    missing: str = ""


_MODELS: dict[str, Callable[[], NamedModel] | str] = {}


def register_model(name: str, target: Callable[[], NamedModel] | str) -> None:
    """Make `load_pipeline(name)` load `target()`; `target` may be `"module:function"`, imported when first used."""
    _MODELS[name] = target


def is_named_model(name: str) -> bool:
    """Whether `name` is a registered model name (registered names win over a folder of the same name)."""
    return name in _MODELS


def named_model(name: str) -> NamedModel | None:
    """The registered model `name`, or None for any other name."""
    target = _MODELS.get(name)
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = _MODELS[name] = getattr(import_module(module), attr)
    return None if target is None else target()


def model_id(model: str | Path) -> str:
    """How a model is recorded in result rows: the absolute path of a local folder, else the name as given."""
    name = str(model)
    path = Path(name).expanduser()
    if not is_named_model(name) and path.exists():
        return str(path.resolve())
    return name


class MethodRegistry(Mapping[str, type[T]], Generic[T]):
    """Method classes by their `name`, in listing order (each class's `rank`, then definition order).

    Filled by the classes themselves as they are defined; `lookup` turns an unknown name into one InputError line
    that lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def add(self, cls: type[T]) -> None:
        """Register `cls` under `cls.name`; another class of the same name is an error (a module imported again,
        e.g. reloaded, replaces its own class)."""
        name: str = cls.name  # type: ignore[attr-defined]
        known = self._classes.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"{self.kind} name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        self._classes[name] = cls

    def discard(self, name: str) -> None:
        """Forget `name` (a method defined for a test)."""
        self._classes.pop(name, None)

    def _order(self) -> list[str]:
        names = list(self._classes)
        return sorted(names, key=lambda n: (getattr(self._classes[n], "rank", 0), names.index(n)))

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._classes)

    def lookup(self, name: Any, option: str) -> type[T]:
        """The class of `name`, or one InputError line naming `option` and the known names."""
        if isinstance(name, str) and name in self._classes:
            return self._classes[name]
        raise InputError(f"{option} must be one of {', '.join(self)}, not {name!r}")
