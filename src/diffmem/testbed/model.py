"""The testbed's components: the exact Stable Diffusion classes, scaled down to 32x32 images and 8x8x4 latents."""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


@lru_cache(maxsize=1)
def build_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions), rebuilt offline from the BPE merges."""
    with gzip.open(clip_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


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
