"""Models known by name, such as `load_pipeline("testbed")`: a registry `diffmem.models.loading` reads and others fill.

`loading` resolves a name here without knowing who registered it (the package root registers the bundled
testbed, `diffmem.testbed.bundled`); a target is a callable or a `"module:function"` string imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path


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
