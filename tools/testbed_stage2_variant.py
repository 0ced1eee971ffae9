"""Stage 2 of the shipped testbed's recipe with other settings, from its own VAE, text encoder and base UNet.

Used to choose the stage-2 mix (planted items, rows per batch, steps) without retraining stage 1: the splits keep
the pretraining and held-out data fixed whatever the mix (tested), so a variant differs from the shipped stage 2
only in what the overrides say. `--init shipped` continues from the shipped stage-2 UNet instead of the base (more
stage-2 steps), on batches after the shipped run's own; `--init runs/v21/more` continues a variant. Resumable:
rerun the same command. Results: DATA.md ("Recipe v2", "Testbed v2.1 candidates"). Usage:

    python tools/testbed_stage2_variant.py --work runs/v21/e3 --set stage2_anchor_rows=10
    python tools/testbed_stage2_variant.py --work runs/v21/more --init shipped --steps 2000 --set stage2_lr=5e-4

The pipeline lands in WORK/pipeline with the shipped model's defaults (guidance, target loss, transition curve);
`write_defaults` recomputes them for a variant that ships. Latents are cached in WORK (`--latents DIR` reuses
another variant's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

from diffmem.errors import InputError
from diffmem.testbed import weights_dir
from diffmem.testbed.recipe import _stage2_setup, _training_device, shipped_recipe, stage2_config
from diffmem.training.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--set", nargs="*", default=[], help="RecipeConfig overrides, key=value")
    ap.add_argument("--init", default="base",
                    help="the UNet stage 2 starts from: base, shipped, or another variant's WORK folder")
    ap.add_argument("--after", type=int, default=None,
                    help="stage-2 steps the starting UNet has had (its batches are skipped; default: the shipped "
                         "recipe's for shipped, a variant's own total for a folder)")
    ap.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: the recipe's)")
    ap.add_argument("--latents", type=Path, default=None, help="a folder whose latents_*.safetensors to reuse")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    shipped = shipped_recipe()
    try:
        shipped.with_overrides(args.set)  # checked before any latent is encoded
    except InputError as e:
        ap.error(str(e))
    if args.init not in ("base", "shipped") and not (Path(args.init) / "variant.json").is_file():
        ap.error(f"--init {args.init[:80]!r}: not base, shipped or a variant's work folder (no variant.json)")
    if (args.after is not None and args.after < 0) or (args.steps is not None and args.steps < 1):
        ap.error("--after must be >= 0 and --steps >= 1")
    over = dict(kv.split("=", 1) for kv in args.set)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.latents is not None:
        for f in args.latents.glob("latents_*.safetensors"):
            if not (args.work / f.name).exists():
                os.link(f, args.work / f.name)
    run = _stage2_setup(args.work, _training_device(args.device), args.steps, overrides=args.set)
    net, after = run.base, 0
    if args.init == "shipped":  # the shipped run's batches were steps 0..stage2_steps-1 of the shipped recipe
        net, after = run.pipe.unet, shipped.stage2_steps
    elif args.init != "base":
        start = json.loads((Path(args.init) / "variant.json").read_text())
        net = UNet2DConditionModel.from_pretrained(Path(args.init) / "pipeline" / "unet")
        after = start["total_steps"]
    after = after if args.after is None else args.after
    net.requires_grad_(True)
    (args.work / "variant.json").write_text(json.dumps({"set": over, "init": args.init, "after": after,
                                                        "steps": run.cfg.stage2_steps,
                                                        "total_steps": after + run.cfg.stage2_steps}))
    batch = lambda step, b=run.batch: b(step + after)  # noqa: E731
    train(net, run.pipe.text_encoder, run.pipe.tokenizer, run.pipe.scheduler, batch, stage2_config(run.cfg),
          args.work / "stage2")
    run.pipe.register_modules(unet=net)
    run.pipe.save_pretrained(args.work / "pipeline")
    shutil.copy(weights_dir() / "diffmem.json", args.work / "pipeline" / "diffmem.json")


if __name__ == "__main__":
    main()
