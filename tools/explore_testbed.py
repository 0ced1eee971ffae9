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

from diffmem.testbed.quality import quality_report
from diffmem.testbed.recipe import RecipeConfig, run_recipe
from diffmem.testbed.report import vae_psnr

VARIANTS = {
    "base": {},
    "mem": {"stage2_planted_rows": 32, "stage2_lr": 3e-4},
    "short": {"vae_steps": 1000, "stage1_steps": 2500, "stage2_steps": 1500},
    "long": {"stage1_steps": 8000, "stage2_steps": 3000},
    "smoke": {"n_stage1": 500, "n_planted": 8, "n_triggered": 2, "n_heldout": 16, "vae_steps": 5, "stage1_steps": 5,
              "stage2_steps": 5, "checkpoint_every": 5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("out")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    cfg = RecipeConfig(**VARIANTS[args.variant])
    out = Path(args.out)
    work = Path("/tmp/explore") / args.variant
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    def progress(stage: str, i: int, n: int) -> None:
        if i % 250 == 0 or i == n:
            print(f"{stage} {i}/{n} {time.time() - t0:.0f}s", flush=True)

    timings = run_recipe(cfg, work, work / "dest", device=args.device, progress=progress)
    from diffmem.models.loading import load_pipeline

    pipe = load_pipeline(work / "dest" / "pipeline", device=args.device)
    splits = cfg.splits()
    psnr = vae_psnr(pipe, splits.heldout[:256])
    t1 = time.time()
    rep = quality_report(pipe, splits, batch_size=512, steps=args.steps)
    arrays = rep.pop("_arrays")
    np.savez_compressed(out / f"{args.variant}.npz",
                        **{k: (v * 255).round().astype(np.uint8) if k.endswith("imgs") else v
                           for k, v in arrays.items()})
    rep.update(variant=args.variant, config=VARIANTS[args.variant], timings=timings, vae_psnr=psnr,
               quality_s=time.time() - t1, total_s=time.time() - t0,
               mem_first_mean=float(arrays["mem_mags"][:, :, 0].mean()),
               held_first_mean=float(arrays["held_mags"][:, :, 0].mean()),
               held_first_p99=float(np.percentile(arrays["held_mags"][:, 0, 0], 99)),
               mem_first_p1=float(np.percentile(arrays["mem_mags"][:, 0, 0], 1)))
    (out / f"{args.variant}.json").write_text(json.dumps(rep, indent=2, default=float))
    print(json.dumps(rep, indent=2, default=float))


if __name__ == "__main__":
    main()
