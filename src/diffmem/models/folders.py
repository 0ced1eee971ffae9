"""Where a model lives: a registered name, a local diffusers folder (checked) or a hub id, resolved without torch.

`loading` and `defaults` both resolve models here, so a command can read a model's defaults before it loads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.config import MAX_STEPS
from diffmem.errors import ModelLoadError
from diffmem.io.files import read_json_object
from diffmem.registry import named_model

DENOISERS = {"StableDiffusionPipeline": ("unet", "UNet2DConditionModel"),
             "StableDiffusionXLPipeline": ("unet", "UNet2DConditionModel"),
             "StableDiffusion3Pipeline": ("transformer", "SD3Transformer2DModel"),
             "PixArtSigmaPipeline": ("transformer", "PixArtTransformer2DModel"),
             "PixArtAlphaPipeline": ("transformer", "PixArtTransformer2DModel"),
             "FluxPipeline": ("transformer", "FluxTransformer2DModel"),
             "IFPipeline": ("unet", "UNet2DConditionModel")}
"""Each pipeline class diffmem loads: its denoiser component and that component's class."""
PIPELINE_NAMES = tuple(DENOISERS)
"""The pipeline classes (model_index.json `_class_name`) diffmem loads."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REQUIRED = ("vae", "text_encoder", "tokenizer", "scheduler")
PIXEL_PIPELINES = ("IFPipeline",)
"""Pipeline classes that denoise pixels: their folders have no VAE."""
_COMPONENTS = tuple(dict.fromkeys((*(part for part, _ in DENOISERS.values()), *_REQUIRED, "text_encoder_2",
                                   "tokenizer_2", "text_encoder_3", "tokenizer_3")))

Check = tuple[Callable[[Any], bool], str]
"""A field's test and, for the message, what it must be."""
MAX_SAMPLE_SIZE = 1024
"""Largest denoiser sample side (latent pixels) a config may name: SDXL, SD3 and Flux use 128, PixArt-sigma 256."""
MAX_CHANNELS = 16384
"""Largest channel count or width a config may name (SD's UNet has 1280, Flux's T5 4096): past it, memory runs
out or sizes overflow before a single weight is read."""


def _name(value: Any) -> bool:
    return isinstance(value, str)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _component(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def _at_most(most: int, least: int = 1) -> Callable[[Any], bool]:
    """A whole number from `least` to `most`: a size past what any model has would overflow or exhaust memory."""
    return lambda value: _count(value) and least <= value <= most


def _one_or_list(test: Callable[[Any], bool], longest: int) -> Callable[[Any], bool]:
    """A value passing `test`, or a list of 1 to `longest` of them."""
    return lambda value: test(value) or (isinstance(value, list) and 0 < len(value) <= longest
                                         and all(test(v) for v in value))


def _scale(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= 1e6)


_side = _at_most(MAX_SAMPLE_SIZE)
_channels = _at_most(MAX_CHANNELS)
_size = _one_or_list(_side, 3)
_width = _one_or_list(_channels, 16)


def _counts(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= 16 and all(_channels(v) for v in value)


SCHEMAS: dict[str, dict[str, Check]] = {
    "model_index.json": {"_class_name": (_name, "a class name"),
                         **{part: (_component, "a [library, class] pair of names or nulls") for part in _COMPONENTS}},
    "scheduler/scheduler_config.json": {"_class_name": (_name, "a class name"),
                                        "prediction_type": (_name, "a name, e.g. epsilon"),
                                        "num_train_timesteps": (_at_most(10**6, MAX_STEPS),
                                                                f"a positive whole number from {MAX_STEPS} (diffmem "
                                                                f"samples up to {MAX_STEPS} steps)")},
    **{f"{part}/config.json": {"_class_name": (_name, "a class name"),
                               "sample_size": (_size, f"a whole number from 1 to {MAX_SAMPLE_SIZE} (or a list of up "
                                               "to 3)"),
                               "in_channels": (_channels, f"a whole number from 1 to {MAX_CHANNELS}"),
                               "out_channels": (_channels, f"a whole number from 1 to {MAX_CHANNELS}"),
                               "cross_attention_dim": (_width, f"a whole number from 1 to {MAX_CHANNELS} (or a "
                                                       "list of them)"),
                               "block_out_channels": (_counts, f"a list of 1 to 16 whole numbers from 1 to "
                                                      f"{MAX_CHANNELS}")}
       for part in ("unet", "transformer")},
    "vae/config.json": {"_class_name": (_name, "a class name"),
                        "block_out_channels": (_counts, f"a list of 1 to 16 whole numbers from 1 to {MAX_CHANNELS}"),
                        "in_channels": (_channels, f"a whole number from 1 to {MAX_CHANNELS}"),
                        "out_channels": (_channels, f"a whole number from 1 to {MAX_CHANNELS}"),
                        "latent_channels": (_channels, f"a whole number from 1 to {MAX_CHANNELS}"),
                        "sample_size": (_one_or_list(_at_most(8 * MAX_SAMPLE_SIZE), 3),  # pixels, not latents
                                        f"a whole number from 1 to {8 * MAX_SAMPLE_SIZE} (or a list of up to 3)"),
                        "scaling_factor": (_scale, "a positive finite number")},
}
"""Per metadata file of a pipeline folder, the types of the fields diffmem reads (others are diffusers' own)."""


def read_metadata(path: Path) -> dict[str, Any]:
    """A pipeline folder's JSON metadata file (model_index.json, a component's config, diffmem.json), read by the
    JSON rule and checked against its schema in SCHEMAS: {} when it is missing, else a JSON object whose fields
    diffmem reads have their types; anything else is one ModelLoadError line naming the file (and the field)."""
    path = Path(path)
    values = read_json_object(path, "model metadata file", ModelLoadError, missing={})
    schema = next((s for name, s in SCHEMAS.items() if path.as_posix().endswith("/" + name)), {})
    for field, (test, what) in schema.items():
        if field in values and values[field] is not None and not test(values[field]):
            shown = repr(values[field])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ModelLoadError(f"{path}: {field} must be {what}, not {shown}")
    return values


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
    if not index.exists():  # something else than a file there is refused by read_metadata, in its own words
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    spec = read_metadata(index)
    kind = spec.get("_class_name", "unknown pipeline")
    if kind not in DENOISERS and spec.get("transformer"):  # another task's transformer pipeline (img2img, ...)
        check_pipeline_name(kind, path)
    part, part_class = DENOISERS.get(kind, ("unet", "UNet2DConditionModel"))
    required = [name for name in (part, *_REQUIRED) if not (name == "vae" and kind in PIXEL_PIPELINES)]
    missing = [name for name in required if not spec.get(name) or spec[name][0] is None]
    if missing:
        raise ModelLoadError(
            f"{path} holds a {kind}, not a text-to-image pipeline diffmem loads (missing {', '.join(missing)})"
        )
    found = spec[part][1]
    if found != part_class:
        raise ModelLoadError(f"{path}: {part} is a {found}; a {kind} folder diffmem loads has a {part_class}")
    check_pipeline_name(spec.get("_class_name"), path)


def check_pipeline_name(name: str | None, where: str | Path) -> str:
    """`name` if diffmem loads pipelines of that class, else one line naming those it supports."""
    if name not in PIPELINE_NAMES:
        raise ModelLoadError(f"{where} holds a {name or 'pipeline without a _class_name'}; diffmem supports "
                             f"{', '.join(PIPELINE_NAMES[:-1])} and {PIPELINE_NAMES[-1]} folders")
    return name
