"""Load a text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, PixArt, Flux, DeepFloyd IF stage I) from a local diffusers
folder, a hub id or `"testbed"`."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError, InputError, ModelLoadError
from diffmem.models.defaults import ModelDefaults, prediction_type_of
from diffmem.models.families import DEEPFLOYD, FLOW, FLUX, NAMES, SD3, UNET, family, network
from diffmem.models.folders import PIPELINE_NAMES, check_pipeline_name
from diffmem.models.folders import resolve_model as resolve_model  # public here since before folders.py
from diffmem.models.weights import check_weights
from diffmem.registry import named_model

#: The pipeline classes (model_index.json `_class_name`) diffmem loads.
SUPPORTED_PIPELINES = {name: getattr(diffusers, name) for name in PIPELINE_NAMES}


def default_device() -> torch.device:
    """CUDA when present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: str | None) -> torch.device | None:
    """`--device` as a torch.device (None: the library's default), checked to exist on this machine."""
    return None if device is None else checked_device(device, "--device", InputError)


def checked_device(device: str | torch.device, name: str = "device",
                   error: type[DiffmemError] = ModelLoadError) -> torch.device:
    """`device` as a torch.device that exists on this machine and can hold weights, or `error` with one line
    (`name` is how the message calls it: `--device` on the command line)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"{name} {device!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "meta":
        raise error(f"{name} {device}: the meta device holds no weights (shapes only); choose cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{name} {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise error(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"{name} {device}: Apple MPS is not available on this machine")
    backend = getattr(torch, dev.type, None)  # xpu, hpu, ...: torch.<type>.is_available() where torch has one
    if dev.type not in ("cpu", "cuda", "mps") and not (backend is not None and hasattr(backend, "is_available")
                                                        and backend.is_available()):
        raise error(f"{name} {device}: {dev.type} is not available on this machine (e.g. cpu, cuda, cuda:1, mps)")
    return dev


MAX_TOKENIZER_WINDOW = 4096
"""Longest token window a UNet-family tokenizer may declare (CLIP's is 77); transformers' stand-in for "unset" is
1e30, which no tensor can be padded to."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Weight dtypes a model can be loaded in, by their `--dtype` names."""


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """`--dtype` as a torch dtype (None: the library's default), with one line for an unknown name."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def checked_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`dtype` (a torch dtype or its name in DTYPES) as one of the DTYPES, or ModelLoadError with one line."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    shown = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else repr(dtype)
    raise ModelLoadError(f"dtype {shown} is not one diffmem loads weights in: use one of {', '.join(DTYPES)} "
                         "(a name or the torch dtype)")


def warn_unhonoured_dtype(pipe: Any, dtype: torch.dtype) -> None:
    """One `warnings.warn` line naming the components whose weights are not in `dtype` after loading (a library
    may keep some in float32), so a requested precision is never changed silently."""
    components = [(n, c) for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    other = [f"{name} ({str(c.dtype).removeprefix('torch.')})" for name, c in components
             if getattr(c, "dtype", dtype) != dtype]
    if other:
        warnings.warn(f"dtype {str(dtype).removeprefix('torch.')} is not honoured for: {', '.join(other)}",
                      stacklevel=3)


def pipeline_class(name: str | None, where: str | Path) -> Any:
    """The diffusers class of a pipeline named `name` in its model_index.json, or one line naming what diffmem
    supports."""
    return SUPPORTED_PIPELINES[check_pipeline_name(name, where)]


def check_guidance(pipe: Any) -> None:
    """Fail unless the pipeline's denoiser takes text conditioning that an empty prompt can replace (CFG), and its
    scheduler samples what the denoiser predicts."""
    check_scheduler(pipe)
    if family(pipe) != UNET:
        _check_transformer_guidance(pipe)
        return
    cfg = pipe.unet.config
    if cfg.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(
            "the model is guidance-distilled (unet.time_cond_proj_dim is set): it does not use "
            "classifier-free guidance, so eps(x, prompt) - eps(x, '') is not defined for it"
        )
    if cfg.get("cross_attention_dim") is None or pipe.text_encoder is None or pipe.tokenizer is None:
        raise ModelLoadError("the model has no text conditioning, so it cannot do classifier-free guidance")
    window = pipe.tokenizer.model_max_length
    if not isinstance(window, int) or not 2 < window <= MAX_TOKENIZER_WINDOW:  # unset: transformers' 1e30
        raise ModelLoadError(f"the tokenizer's model_max_length is {window}, not a text encoder's window (3 to "
                             f"{MAX_TOKENIZER_WINDOW} tokens; CLIP's is 77): set it in tokenizer/tokenizer_config.json")
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]  # SDXL: both, side by side
    hidden = sum(getattr(e.config, "hidden_size", 0) for e in encoders if e is not None) or None
    cross = cfg.cross_attention_dim
    if hidden is not None and isinstance(cross, int) and hidden != cross:
        raise ModelLoadError(
            f"text encoder width {hidden} does not match the UNet's cross_attention_dim {cross}"
        )


def check_scheduler(pipe: Any) -> None:
    """Fail unless the scheduler matches the model's prediction: a FlowMatch scheduler for a rectified-flow model
    (SD3, Flux), a diffusion one for the others."""
    kind, name = family(pipe), type(pipe.scheduler).__name__
    flow = prediction_type_of(name, None) == "flow"
    if (kind in FLOW) != flow:
        wants = ("a FlowMatch scheduler (it predicts a rectified-flow velocity)" if kind in FLOW
                 else "a diffusion scheduler such as DDIM, Euler or DPM-Solver (it predicts noise)")
        raise ModelLoadError(f"the scheduler ({name}) does not match the model: {NAMES[kind]} needs {wants}")


def _check_transformer_guidance(pipe: Any) -> None:
    """`check_guidance` for SD3, PixArt, Flux and DeepFloyd IF: the text encoders CFG needs, their widths, and for
    Flux a pipeline that runs true CFG against a negative prompt."""
    kind, name = family(pipe), type(pipe).__name__
    needed = {SD3: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
              FLUX: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}.get(kind, ("text_encoder",
                                                                                              "tokenizer"))
    missing = [part for part in needed if getattr(pipe, part, None) is None]
    if missing:
        raise ModelLoadError(f"the {name} has no {', '.join(missing)}: it cannot do classifier-free guidance")
    if kind == FLUX:
        params = inspect.signature(type(pipe).__call__).parameters
        if "negative_prompt" not in params or "true_cfg_scale" not in params:
            raise ModelLoadError(f"this diffusers' {name} cannot run a negative prompt (its __call__ takes no "
                                 "negative_prompt and true_cfg_scale), so v(x, prompt) - v(x, '') is not defined for "
                                 "it: upgrade diffusers")
    t5 = {SD3: "text_encoder_3", FLUX: "text_encoder_2"}.get(kind, "text_encoder")
    encoder, cfg = getattr(pipe, t5, None), network(pipe).config
    width = None if encoder is None else getattr(encoder.config, "d_model", None)
    wanted = cfg.get("caption_channels") or cfg.get("joint_attention_dim") or (
        cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim") if kind == DEEPFLOYD else None)
    if width is not None and isinstance(wanted, int) and width != wanted:
        denoiser = "UNet" if kind == DEEPFLOYD else "transformer"
        raise ModelLoadError(f"the T5 text encoder's width {width} does not match the {denoiser}'s {wanted}")


def load_pipeline(
    model: str | Path = "testbed",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    allow_pickle: bool = False,
) -> Any:
    """Load a Stable Diffusion 1.x/2.x (epsilon or v-prediction), SDXL, SD3, PixArt-alpha/sigma, Flux or DeepFloyd IF
    (stage I) pipeline ready for scoring.

    `model` is a local diffusers folder, a hub id (downloaded only when online) or a registered name such as
    `"testbed"` (`diffmem.register_model`).
    `dtype` (a torch dtype or its name: float32, float16, bfloat16) defaults to float16 on CUDA and float32
    elsewhere; it is honoured on every device, the CPU included (a component left in another dtype is named in
    a warning). A device that does not exist here (`"cuda:99"`, `"nonsense"`) or holds no weights (`"meta"`),
    and any other dtype, fail before anything is read. Errors are `ModelLoadError` with one line.
    Weights are read from safetensors files only; `allow_pickle=True` also loads pickled ones (`.bin`, `.ckpt`),
    which can run code: only for a folder you trust.

        >>> from diffmem import load_pipeline
        >>> pipe = load_pipeline("testbed", device="cpu")  # the bundled tiny SD model; or a folder, or a hub id
        >>> type(pipe).__name__, pipe.device.type, pipe.unet.dtype
        ('StableDiffusionPipeline', 'cpu', torch.float32)
        >>> pipe("a red diamond at the center on a striped background", num_inference_steps=10).images[0].size
        (32, 32)
    """
    device = checked_device(device) if device is not None else default_device()  # fail fast, before reading
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = checked_dtype(dtype)
    source = resolve_model(model)
    check_weights(source, allow_pickle)
    defaults = ModelDefaults.from_folder(source) if Path(source).is_dir() else None  # a bad diffmem.json fails now
    try:
        index = _model_index(source)
        cls = pipeline_class(index.get("_class_name"), model)
        pipe: Any = cls.from_pretrained(
            source,
            **dtype_kwarg(dtype),
            use_safetensors=None if allow_pickle else True,
            **_saved_without(index) | _without_checkers(cls),
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many types; the user needs one line naming the cause
        raise ModelLoadError(f"could not load {model}: {_first_line(exc)}") from None
    if not isinstance(pipe, tuple(SUPPORTED_PIPELINES.values())):
        raise ModelLoadError(f"{model} is not a text-to-image pipeline diffmem loads ({', '.join(PIPELINE_NAMES)})")
    pipe = _untyped(pipe)  # diffusers registers components dynamically; the stubs do not know them
    named = named_model(str(model))
    if named is not None and named.unet is not None:
        pipe.unet = UNet2DConditionModel.from_pretrained(named.unet, use_safetensors=True, **dtype_kwarg(dtype))
    check_guidance(pipe)
    (ModelDefaults.from_pipeline(pipe) if defaults is None else defaults).attach(pipe)  # hub id: its class's
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, AssertionError) as exc:  # out of memory, a driver error: one line naming the cause
        raise ModelLoadError(f"could not move {model} to {device}: {_first_line(exc)}") from None
    warn_unhonoured_dtype(pipe, dtype)
    return pipe


def _model_index(source: str) -> dict[str, Any]:
    """The model_index.json of the pipeline at `source`: from its folder, or for a hub id that file only."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))


def _saved_without(index: dict[str, Any]) -> dict[str, None]:
    """The components a folder was saved without (`[null, null]` in its index, e.g. SD3 without T5): passed as
    None, as diffusers asks of a pipeline whose class lists them as required."""
    return {name: None for name, entry in index.items() if isinstance(entry, list) and entry == [None, None]}


CHECKERS = ("safety_checker", "feature_extractor", "watermarker")
"""Optional components that filter or mark a pipeline's output images (SD's safety checker, IF's watermarker):
diffmem measures what the denoiser makes, so it loads without them."""


def _without_checkers(cls: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that leave out the `CHECKERS` the pipeline class takes (and its warning)."""
    params = inspect.signature(cls.__init__).parameters
    values: dict[str, Any] = {name: None for name in CHECKERS if name in params}
    if "requires_safety_checker" in params:
        values["requires_safety_checker"] = False
    return values


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
