"""Is the testbed's held-out alignment limited by training compute? Continue stage 1 and re-measure it.

Loads the shipped base UNet and text encoder (`testbed-base`), trains both further on the stage-1 data with the
recipe's loop (lr 5e-4, batch 64; 600 steps, then resumed to 1200 with a new 1200-step schedule), and reads the
attributes of 96 held-out prompts x 2 seeds (DDIM 50) at guidance 3 and 7.5 with the testbed's classifier, before
and after. First it measures the ceiling the VAE sets: the held-out items' own renders after a VAE round trip,
read by the same classifier, by object size. Results: DATA.md, "Held-out alignment against training compute".
About 16 min on 2 CPU cores:
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 python tools/shape_vs_compute.py runs/shape
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.alignment import aligned, attribute_accuracy
from diffmem.testbed.model import vae_roundtrip
from diffmem.testbed.quality import generate
from diffmem.testbed.recipe import latents_for, shipped_recipe, stage1_batches
from diffmem.testbed.scenes import render_items
from diffmem.training.loop import TrainConfig, train


def vae_ceiling(pipe, items) -> dict:
    """Aligned share and shape accuracy of the items' true renders after the VAE round trip, by object size."""
    images = vae_roundtrip(pipe.vae, render_items(items))
    ok = np.asarray(aligned(images, [i.scene for i in items]))
    shape = np.array([attribute_accuracy(images[k : k + 1], [i.scene])["shape"] for k, i in enumerate(items)])
    result = {}
    for size in sorted({i.scene.size for i in items}):
        mask = np.array([i.scene.size == size for i in items])
        result[size] = {"aligned": float(ok[mask].mean()), "shape": float(shape[mask].mean()), "n": int(mask.sum())}
    result["all"] = {"aligned": float(ok.mean()), "shape": float(shape.mean()), "n": len(items)}
    return result


def evaluate(pipe, held) -> dict:
    """Attribute accuracy and aligned share of 96 held-out prompts x 2 seeds, at guidance 3 and 7.5."""
    pipe.unet.eval()
    pipe.text_encoder.eval()
    scenes = [i.scene for i in held for _ in range(2)]
    result = {}
    for guidance in (3.0, 7.5):
        images, _ = generate(pipe, [i.caption for i in held], generations=2, seed=0, guidance=guidance)
        flat = images.reshape(-1, *images.shape[2:])
        result[guidance] = {**attribute_accuracy(flat, scenes), "aligned": float(np.mean(aligned(flat, scenes)))}
    return result


def main(work: Path) -> None:
    quiet_diffusers()
    work.mkdir(parents=True, exist_ok=True)
    cfg = shipped_recipe()
    splits = cfg.splits()
    pipe = load_pipeline("testbed-base", device="cpu", dtype=torch.float32)
    z1 = latents_for(pipe.vae, splits.stage1, torch.device("cpu"), work / "latents_stage1.safetensors")
    batches = stage1_batches(z1, [i.caption for i in splits.stage1], cfg)
    held = splits.heldout[:96]
    report = {"vae_ceiling": vae_ceiling(pipe, splits.heldout)}
    print("vae_ceiling", json.dumps(report["vae_ceiling"]), flush=True)
    report["step0"] = evaluate(pipe, held)
    print("step0", json.dumps(report["step0"]), flush=True)
    start = time.time()
    for steps in (600, 1200):
        pipe.unet.train()
        pipe.text_encoder.train()
        run = TrainConfig(steps=steps, batch_size=64, lr=5e-4, seed=1, train_text_encoder=True, checkpoint_every=300)
        train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batches, run, work / "run")
        report[f"step{steps}"] = evaluate(pipe, held)
        report[f"step{steps}"]["train_s"] = round(time.time() - start)
        print(f"step{steps}", json.dumps(report[f"step{steps}"]), flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shape"))
