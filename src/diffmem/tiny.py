"""Tiny randomly initialised Stable Diffusion pipelines (SD 1-style epsilon, SD 2-style v-prediction).

They exercise every code path in seconds: tests save them to a folder and load them back as a user would.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffmem.testbed.model import (
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    VAE_CONFIG,
    assemble_pipeline,
    build_tokenizer,
)

KINDS = ("sd1", "sd2-v")


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> StableDiffusionPipeline:
    """A random 32x32-pixel pipeline: `sd1` (epsilon, GELU-free CLIP) or `sd2-v` (v-prediction, linear proj)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    sd2 = kind == "sd2-v"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": (16, 32, 32)})
    text_config = {**TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "projection_dim": 32, "hidden_act": "gelu" if sd2 else "quick_gelu"}
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction" if sd2 else "epsilon"})
    comps = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=build_tokenizer(), scheduler=scheduler)
    return assemble_pipeline(comps)
