"""Load a Stable-Diffusion-family text-to-image pipeline from a local diffusers folder, a hub id or `"testbed"`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from diffmem.errors import InputError, ModelLoadError
from diffmem.models.defaults import ModelDefaults
from diffmem.models.folders import check_pipeline_name
from diffmem.models.folders import resolve_model as resolve_model  # public here since before folders.py
from diffmem.models.weights import check_weights
from diffmem.registry import named_model

#: The pipeline classes (model_index.json `_class_name`) diffmem loads.
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline,
                       "StableDiffusionXLPipeline": StableDiffusionXLPipeline}


def default_device() -> torch.device:
    """CUDA when present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: str | None) -> torch.device | None:
    """`--device` as a torch.device (None: the library's default), checked to exist on this machine."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: Apple MPS is not available on this machine")
    return dev


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Weight dtypes a model can be loaded in, by their `--dtype` names."""


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """`--dtype` as a torch dtype (None: the library's default), with one line for an unknown name."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def pipeline_class(name: str | None, where: str | Path) -> Any:
    """The diffusers class of a pipeline named `name` in its model_index.json, or one line naming what diffmem
    supports."""
    return SUPPORTED_PIPELINES[check_pipeline_name(name, where)]


def check_guidance(pipe: Any) -> None:
    """Fail unless the pipeline's denoiser takes text conditioning that an empty prompt can replace (CFG)."""
    cfg = pipe.unet.config
    if cfg.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(
            "the model is guidance-distilled (unet.time_cond_proj_dim is set): it does not use "
            "classifier-free guidance, so eps(x, prompt) - eps(x, '') is not defined for it"
        )
    if cfg.get("cross_attention_dim") is None or pipe.text_encoder is None or pipe.tokenizer is None:
        raise ModelLoadError("the model has no text conditioning, so it cannot do classifier-free guidance")
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]  # SDXL: both, side by side
    hidden = sum(getattr(e.config, "hidden_size", 0) for e in encoders if e is not None) or None
    cross = cfg.cross_attention_dim
    if hidden is not None and isinstance(cross, int) and hidden != cross:
        raise ModelLoadError(
            f"text encoder width {hidden} does not match the UNet's cross_attention_dim {cross}"
        )


def load_pipeline(
    model: str | Path = "testbed",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Any:
    """Load a Stable Diffusion 1.x/2.x (epsilon or v-prediction) or SDXL pipeline ready for scoring.

    `model` is a local diffusers folder, a hub id (downloaded only when online) or a registered name such as
    `"testbed"` (`diffmem.register_model`).
    `dtype` defaults to float16 on CUDA and float32 elsewhere. Errors are `ModelLoadError` with one line.
    Weights are read from safetensors files only; `allow_pickle=True` also loads pickled ones (`.bin`, `.ckpt`),
    which can run code: only for a folder you trust.
    """
    source = resolve_model(model)
    check_weights(source, allow_pickle)
    defaults = ModelDefaults.from_folder(source) if Path(source).is_dir() else None  # a bad diffmem.json fails now
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        cls = pipeline_class(_class_name(source), model)
        sd_only = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe: Any = cls.from_pretrained(
            source,
            **dtype_kwarg(dtype),
            use_safetensors=None if allow_pickle else True,
            **(sd_only if cls is StableDiffusionPipeline else {}),
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many types; the user needs one line naming the cause
        raise ModelLoadError(f"could not load {model}: {_first_line(exc)}") from None
    if not isinstance(pipe, tuple(SUPPORTED_PIPELINES.values())):
        raise ModelLoadError(f"{model} is not a Stable Diffusion text-to-image pipeline")
    pipe = _untyped(pipe)  # diffusers registers components dynamically; the stubs do not know them
    named = named_model(str(model))
    if named is not None and named.unet is not None:
        pipe.unet = UNet2DConditionModel.from_pretrained(named.unet, use_safetensors=True, **dtype_kwarg(dtype))
    check_guidance(pipe)
    (ModelDefaults.from_pipeline(pipe) if defaults is None else defaults).attach(pipe)  # hub id: its class's
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _class_name(source: str) -> str | None:
    """`_class_name` of the pipeline at `source`: from its folder, or for a hub id its model_index.json only."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source).get("_class_name")


def _untyped(obj: Any) -> Any:
    return obj


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` on diffusers that deprecated `torch_dtype`, else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if new else "torch_dtype": dtype}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def quiet_diffusers() -> None:
    """Silence diffusers/transformers info, warnings and loading progress bars (for clean CLI output)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()
