"""The testbed's components: the exact Stable Diffusion classes, scaled down to 32x32 images and 8x8x4 latents."""

from __future__ import annotations

import copy
import gzip
import json
import tempfile
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffmem.errors import DiffmemError

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_WIDTH = 64

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=32,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=IMAGE_SIZE,
    norm_num_groups=16,
)

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)

# Stable Diffusion v1's noise schedule and DDIM settings.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


SD3_TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=2 * TEXT_WIDTH,  # the two CLIP encoders' hidden states side by side
    caption_projection_dim=128,
    pooled_projection_dim=2 * TEXT_WIDTH,
    pos_embed_max_size=LATENT_SIZE,  # in patches: images up to 64x64
)
"""The SD3 testbed's MMDiT: SD3's blocks (joint attention, adaLN, 2x2 patches), 6 layers 128 wide."""

SD3_TEXT_WINDOW = 32
"""CLIP positions the SD3 testbed reads (its captions take at most 18): CLIP's attention is causal, so the first
32 positions are the same as in a 77-token window; SD3 pads the missing T5 with as many rows of zeros."""

SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
"""Rectified flow without SD3's shift of 3, which is for 1024-pixel images (a shift grows with resolution)."""


def clip_bpe_file() -> Path:
    """The CLIP BPE merges shipped in the `open_clip_torch` wheel (install it with `--no-deps`; never imported)."""
    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DiffmemError("building the testbed tokenizer needs `pip install --no-deps open_clip_torch`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise DiffmemError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table that the BPE vocabulary is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=2)
def build_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions unless told), rebuilt offline from the BPE merges."""
    with gzip.open(clip_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=model_max_length)


def build_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Freshly initialised (seeded) UNet, VAE, text encoder, tokenizer and DDIM scheduler (`epsilon` as SD 1,
    `v_prediction` as SD 2)."""
    import torch

    torch.manual_seed(seed)
    return dict(
        unet=UNet2DConditionModel(**UNET_CONFIG),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        tokenizer=build_tokenizer(),
        scheduler=DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}),
    )


def build_sd3_components(text_encoder: CLIPTextModel, vae: AutoencoderKL, seed: int = 0) -> dict:
    """The SD3 testbed's components: a freshly initialised (seeded) MMDiT and flow-matching scheduler, with the
    UNet testbed's trained VAE (given a `shift_factor` of 0, which SD3 decodes with) and its trained CLIP encoder in
    both of SD3's CLIP slots (with an identity projection for the pooled embedding), frozen as SD3's encoders are;
    no T5 (SD3 runs without it)."""
    import torch

    encoders = []
    for _ in range(2):
        clip = CLIPTextModelWithProjection(text_encoder.config)
        clip.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
        with torch.no_grad():
            clip.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
        encoders.append(clip.requires_grad_(False))
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)  # type: ignore[attr-defined]
    tokenizer = build_tokenizer(SD3_TEXT_WINDOW)
    torch.manual_seed(seed)
    return dict(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG), vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
                text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None)


def assemble_pipeline(components: dict) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from testbed components (no safety checker: the images are synthetic)."""
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def vae_roundtrip(vae: Any, images: Any, batch: int = 512) -> Any:
    """Images (N, 3, H, W) in [0, 1] encoded (latent mean) and decoded by `vae`: what any generation passes
    through, so instruments that read generated images (the alignment classifier) are trained on it too."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.asarray(images[start : start + batch])).to(vae.device, vae.dtype) * 2 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((rec.float().clamp(-1, 1) + 1) / 2).cpu().numpy())
    return np.concatenate(out) if out else np.zeros_like(np.asarray(images), dtype=np.float32)
