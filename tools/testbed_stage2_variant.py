"""Stage 2 of the testbed recipe with other settings, from a recipe run's own VAE, text encoder and base UNet.

Used to choose the stage-2 mix (planted items, rows per batch) without retraining stage 1: the splits keep the
pretraining and held-out data fixed whatever the mix (tested), so a variant differs from the recipe's own stage 2
only in what the overrides say. Resumable. Results: DATA.md, "Recipe v2". Usage:

    python tools/testbed_stage2_variant.py --work runs/testbed --out runs/exp/e2 \
        --set n_planted=64 n_triggered=16 stage2_planted_rows=20 stage2_anchor_rows=5
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffmem.testbed.model import assemble_pipeline, build_components
from diffmem.testbed.recipe import RecipeConfig, _stage2_pools, latents_for, stage2_batches, stage2_config
from diffmem.training.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the recipe run's work folder (stage 1 done)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", nargs="*", default=[], help="RecipeConfig overrides, key=value")
    args = ap.parse_args()
    cfg = RecipeConfig(**json.loads((args.work / "recipe.json").read_text()))
    over = dict(kv.split("=") for kv in args.set)
    cfg = replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in over.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cfg.json").write_text(json.dumps(over))
    splits = cfg.splits()
    comps = build_components(cfg.seed, cfg.prediction_type)
    vae = AutoencoderKL.from_pretrained(args.work / "vae").eval()
    unet, te = comps["unet"], comps["text_encoder"]
    te.load_state_dict(load_file(str(args.work / "stage1/checkpoint/text_encoder.safetensors")))
    unet.load_state_dict(load_file(str(args.work / "base_unet.safetensors")))
    dev = torch.device("cpu")
    zs = [latents_for(vae, getattr(splits, n), dev, args.out / f"latents_{n}.safetensors")
          for n in ("planted", "anchors", "stage2_unique")]
    zs.append(load_file(str(args.work / "latents_stage1.safetensors"))["latents"])
    te.requires_grad_(False)
    train(unet, te, comps["tokenizer"], comps["scheduler"], stage2_batches(*_stage2_pools(splits, *zs), cfg),
          stage2_config(cfg), args.out / "stage2")
    assemble_pipeline({**comps, "unet": unet, "text_encoder": te, "vae": vae}).save_pretrained(args.out / "pipeline")


if __name__ == "__main__":
    main()
