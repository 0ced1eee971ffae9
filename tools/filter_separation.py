"""How well the training-time filter's `d` separates planted from seen-once stage-2 samples on the testbed.

`d` of each planted item (4 draws each, 512 in all) and of 512 seen-once items, at random training timesteps as
the filter sees them, under the base UNet and under the memorizing (shipped) one; shares above a few TAUs and the
AUC. Needs the latent caches of `diffmem testbed stage2 --calibrate --work WORK`. Usage:
    python tools/filter_separation.py runs/s2v1/base 2.65 3.85 4.31 6.11
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from sklearn.metrics import roc_auc_score

from diffmem.loading import load_pipeline, quiet_diffusers
from diffmem.testbed import WEIGHTS
from diffmem.testbed.recipe import latents_for, shipped_recipe
from diffmem.train import measure_magnitudes


def main(work: Path, taus: list[float], n: int = 512, seed: int = 0) -> dict:
    quiet_diffusers()
    splits = shipped_recipe().splits()
    pipe = load_pipeline("testbed", device="cpu")
    zp = latents_for(pipe.vae, splits.planted, torch.device("cpu"), work / "latents_planted.safetensors")
    zu = latents_for(pipe.vae, splits.stage2_unique, torch.device("cpu"), work / "latents_stage2_unique.safetensors")
    reps = n // len(splits.planted)
    latents = torch.cat([zp.repeat(reps, 1, 1, 1), zu[:n]])
    captions = [i.caption for i in splits.planted] * reps + [i.caption for i in splits.stage2_unique[:n]]
    planted = np.arange(len(captions)) < reps * len(splits.planted)
    base = UNet2DConditionModel.from_pretrained(WEIGHTS / "base_unet")
    report = {}
    for name, unet in (("base", base), ("memorizing", pipe.unet)):
        d = measure_magnitudes(unet.eval(), pipe.text_encoder, pipe.tokenizer, pipe.scheduler, latents, captions,
                               torch.arange(len(captions)), torch.Generator().manual_seed(seed), batch_size=64).numpy()
        report[name] = {
            "median": {"planted": float(np.median(d[planted])), "seen_once": float(np.median(d[~planted]))},
            "share_at_or_above": {f"{tau:g}": {"planted": float((d[planted] >= tau).mean()),
                                               "seen_once": float((d[~planted] >= tau).mean())} for tau in taus},
            "auc_planted_vs_seen_once": float(roc_auc_score(planted, d)),
        }
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), [float(v) for v in sys.argv[2:]]), indent=1))
