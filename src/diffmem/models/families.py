"""Which family of text-to-image model a pipeline is, read once here so every module asks the same question.

`unet`: Stable Diffusion 1.x/2.x and SDXL (a UNet with cross-attention, epsilon or v prediction). `sd3`: Stable
Diffusion 3/3.5 (MMDiT, rectified flow, three text encoders). `pixart`: PixArt-alpha/sigma (DiT with
cross-attention to T5, epsilon with learned variance). `flux`: Flux.1 (MMDiT, rectified flow, guidance-distilled).
`deepfloyd`: DeepFloyd IF stage I (a pixel-space UNet with cross-attention to T5, epsilon with learned variance,
no VAE). The transformer families attend jointly (`sd3`, `flux`) or without UNet blocks (`pixart`), and IF's UNet
attends to T5 tokens: the methods that read SD's CLIP-token cross-attention maps apply to none of them
(`require_unet`).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffmem.errors import InputError

UNET, SD3, PIXART, FLUX, DEEPFLOYD = "unet", "sd3", "pixart", "flux", "deepfloyd"
FAMILIES = {"StableDiffusionPipeline": UNET, "StableDiffusionXLPipeline": UNET,
            "StableDiffusion3Pipeline": SD3, "PixArtSigmaPipeline": PIXART, "PixArtAlphaPipeline": PIXART,
            "FluxPipeline": FLUX, "IFPipeline": DEEPFLOYD}
"""The family of each pipeline class diffmem loads (model_index.json `_class_name`)."""
FLOW = frozenset({SD3, FLUX})
"""Families trained by rectified flow (`x_t = (1 - s) x0 + s eps`, the network predicts `v = eps - x0`)."""
PIXEL = frozenset({DEEPFLOYD})
"""Families that denoise pixels: no VAE, the denoiser's sample is the image."""
LEARNED_VARIANCE = frozenset({PIXART, DEEPFLOYD})
"""Families whose denoiser also predicts its variance (twice the input's channels): the prediction is the first half."""
NAMES = {UNET: "Stable Diffusion 1.x/2.x/XL", SD3: "Stable Diffusion 3", PIXART: "PixArt", FLUX: "Flux",
         DEEPFLOYD: "DeepFloyd IF"}


def family(pipe: Any) -> str:
    """The family of `pipe`: its class's (or a base class's) entry in FAMILIES, else `unet` when it has a UNet."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    if getattr(pipe, "unet", None) is not None:
        return UNET
    raise InputError(f"{type(pipe).__name__} is not a pipeline diffmem supports ({', '.join(FAMILIES)})")


def network(pipe: Any) -> Any:
    """The denoiser network of `pipe`: `pipe.unet` for the UNet families (SD, DeepFloyd IF), `pipe.transformer` for
    the others."""
    return pipe.unet if family(pipe) in (UNET, DEEPFLOYD) else pipe.transformer


def scale_factor(pipe: Any) -> int:
    """Image pixels per denoiser sample pixel: the VAE's scale factor, 1 for a pixel-space family."""
    return 1 if family(pipe) in PIXEL else int(pipe.vae_scale_factor)


def call_default(pipe: Any, name: str) -> Any:
    """The default of argument `name` of the pipeline's `__call__` (what a plain `pipe(prompt)` call uses)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def unet_only(pipe: Any, method: str) -> str | None:
    """Why `method`, which reads UNet cross-attention maps, cannot run on `pipe`'s model (one line), else None."""
    kind = family(pipe)
    if kind == UNET:
        return None
    why = ("joint attention has no cross-attention map" if kind in FLOW
           else "its UNet attends to T5 tokens, not the CLIP tokens the method reads" if kind == DEEPFLOYD
           else "its DiT blocks are not the UNet cross-attention layers it reads")
    has = "is not Stable Diffusion's UNet" if kind == DEEPFLOYD else "has no UNet"
    return f"{method} reads UNet cross-attention maps; {NAMES[kind]} {has}: {why}"


def require_unet(pipe: Any, method: str) -> None:
    """Refuse, with `unet_only`'s line, to run a method that reads UNet cross-attention maps on a transformer."""
    if reason := unet_only(pipe, method):
        raise InputError(reason)
