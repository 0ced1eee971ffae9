"""Dev tool: run recipe variants (e.g. on a GPU, several at once) and write their quality figures as JSON.

Used to choose the testbed recipe before the shipped CPU run; not part of the package.
    python tools/explore_testbed.py VARIANT OUT_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from diffmem.testbed.alignment import attribute_accuracy
from diffmem.testbed.quality import quality_report
from diffmem.testbed.recipe import RecipeConfig, run_recipe
from diffmem.testbed.report import vae_psnr

VARIANTS = {
    "base": {},
    "mem": {"stage2_planted_rows": 32, "stage2_lr": 3e-4},
    "short": {"vae_steps": 1000, "stage1_steps": 2500, "stage2_steps": 1500},
    "long": {"stage1_steps": 8000, "stage2_steps": 3000},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("out")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    cfg = RecipeConfig(**VARIANTS[args.variant])
    out = Path(args.out)
    work = Path("/tmp/explore") / args.variant
    t0 = time.time()
    timings = run_recipe(cfg, work, work / "dest", device=args.device)
    from diffmem.loading import load_pipeline

    pipe = load_pipeline(work / "dest" / "pipeline", device=args.device)
    splits = cfg.splits()
    psnr = vae_psnr(pipe, splits.heldout[:256])
    t1 = time.time()
    rep = quality_report(pipe, splits, batch_size=512)
    arrays = rep.pop("_arrays")
    held_imgs = arrays["held_imgs"]
    rep["heldout_attribute_accuracy"] = attribute_accuracy(
        held_imgs.reshape(-1, *held_imgs.shape[2:]), [i.scene for i in splits.heldout for _ in range(4)]
    )
    rep.update(variant=args.variant, config=VARIANTS[args.variant], timings=timings, vae_psnr=psnr,
               quality_s=time.time() - t1, total_s=time.time() - t0,
               mem_first_mean=float(arrays["mem_mags"][:, :, 0].mean()),
               held_first_mean=float(arrays["held_mags"][:, :, 0].mean()),
               held_first_p99=float(np.percentile(arrays["held_mags"][:, 0, 0], 99)),
               mem_first_p1=float(np.percentile(arrays["mem_mags"][:, 0, 0], 1)))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.variant}.json").write_text(json.dumps(rep, indent=2, default=float))
    print(json.dumps(rep, indent=2, default=float))


if __name__ == "__main__":
    main()
