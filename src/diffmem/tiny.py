"""Tiny randomly initialised Stable Diffusion pipelines (SD 1-style epsilon, SD 2-style v-prediction).

They exercise every code path in seconds: tests save them to a folder and load them back as a user would.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffmem.testbed.model import assemble_pipeline, build_tokenizer

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    comps = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=build_tokenizer(), scheduler=scheduler)
    return assemble_pipeline(comps)
