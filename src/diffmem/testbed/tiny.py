"""Tiny randomly initialised Stable Diffusion pipelines (SD 1-style epsilon, SD 2-style v-prediction, SDXL).

They exercise every code path in seconds: tests save them to a folder and load them back as a user would.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffmem.testbed.model import (
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    VAE_CONFIG,
    assemble_pipeline,
    build_tokenizer,
)

KINDS = ("sd1", "sd2-v", "sdxl")
TINY_UNET: dict[str, Any] = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64), norm_num_groups=16)
TINY_VAE: dict[str, Any] = {**VAE_CONFIG, "block_out_channels": (16, 32, 32)}
TINY_TEXT: dict[str, Any] = {**TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "projection_dim": 32}


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A random 32x32-pixel pipeline: `sd1` (epsilon, GELU-free CLIP), `sd2-v` (v-prediction, linear proj) or
    `sdxl` (see `tiny_sdxl`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if kind == "sdxl":
        return tiny_sdxl(seed)
    sd2 = kind == "sd2-v"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction" if sd2 else "epsilon"})
    comps = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=build_tokenizer(), scheduler=scheduler)
    return assemble_pipeline(comps)


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL pipeline at 32x32 pixels: two CLIP text encoders side by side (the second with a projection,
    its tokenizer padding with "!" as SDXL's does), pooled-text and time-id conditioning (`text_time`), SDXL's
    Euler scheduler, and `force_zeros_for_empty_prompt` (the empty prompt's embeddings are zeros)."""
    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TINY_TEXT["projection_dim"],
        cross_attention_dim=2 * TINY_TEXT["hidden_size"],
    )
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, hidden_act="gelu"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT, hidden_act="gelu"))
    tokenizer_2 = copy.deepcopy(build_tokenizer())  # the cached tokenizer itself must not change
    tokenizer_2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=text, text_encoder_2=text_2, tokenizer=build_tokenizer(),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


class TinyDescriptor(torch.nn.Module):
    """A stand-in for SSCD's ResNet-50 descriptor (unnormalised output): a strided conv, pooling, a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.head = torch.nn.Linear(8 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return self.head(h.flatten(1))


def save_tiny_sscd(path: str | Path, seed: int = 0) -> TinyDescriptor:
    """A `TinyDescriptor` traced and saved as the SSCD authors ship theirs (`torch.jit.trace`, `torch.jit.save`);
    returns the module (for a reference computation)."""
    module = TinyDescriptor(seed).eval()
    torch.jit.save(torch.jit.trace(module, torch.randn(1, 3, 64, 64)), str(path))
    return module


def save_tiny_clip(folder: str | Path, seed: int = 0) -> None:
    """A random CLIPModel (32x32-pixel images, 16-wide embeddings) and its processor (the CLIP BPE tokenizer)
    saved as a transformers folder, as a LAION or OpenAI CLIP checkpoint is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    config = CLIPConfig(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer()).save_pretrained(folder)
