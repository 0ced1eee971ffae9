"""Where a model lives: a registered name, a local diffusers folder (checked) or a hub id, resolved without torch.

`loading` and `defaults` both resolve models here, so a command can read a model's defaults before it loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffmem.errors import ModelLoadError
from diffmem.registry import named_model

PIPELINE_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
"""The pipeline classes (model_index.json `_class_name`) diffmem loads."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model(model: str | Path) -> str:
    """Map a registered name (`testbed`) to its folder; check a local folder is a text-to-image pipeline; pass hub
    ids on."""
    name = str(model)
    named = named_model(name)
    if named is not None:
        path = named.pipeline
        if not (path / "model_index.json").is_file():
            hint = f": {named.missing}" if named.missing else ""
            raise ModelLoadError(f"the bundled {name} weights are missing at {path}{hint}")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        _check_folder(path)
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelLoadError(f"model folder not found: {name}")


def _check_folder(path: Path) -> None:
    """Fail with one clear line unless `path` is a diffusers text-to-image pipeline folder."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a diffusers pipeline folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        spec = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index} is not valid JSON: {exc}") from None
    missing = [name for name in _REQUIRED if not spec.get(name) or spec[name][0] is None]
    if missing:
        kind = spec.get("_class_name", "unknown pipeline")
        raise ModelLoadError(
            f"{path} holds a {kind}, not a Stable Diffusion text-to-image pipeline (missing {', '.join(missing)})"
        )
    unet_class = spec["unet"][1]
    if unet_class != "UNet2DConditionModel":
        raise ModelLoadError(f"{path}: unet is a {unet_class}; diffmem supports UNet2DConditionModel pipelines")
    check_pipeline_name(spec.get("_class_name"), path)


def check_pipeline_name(name: str | None, where: str | Path) -> str:
    """`name` if diffmem loads pipelines of that class, else one line naming those it supports."""
    if name not in PIPELINE_NAMES:
        raise ModelLoadError(f"{where} holds a {name or 'pipeline without a _class_name'}; diffmem supports "
                             f"{' and '.join(PIPELINE_NAMES)} folders")
    return name
