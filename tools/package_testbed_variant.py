"""Package a stage-2 variant (`tools/testbed_stage2_variant.py`) as a testbed folder, exactly as it would ship.

The pipeline is rounded to float16 (as `save_testbed` stores it) before its defaults are measured, so the target
loss and the transition curve in diffmem.json are those of the weights users load. The stage-1 base is the shipped
one (every variant starts from it); recipe.json keeps the shipped recipe (the splits, hence the ground truth, do
not change) and records the chain of stage-2 runs that made the variant under "stage2_runs". Usage:

    python tools/package_testbed_variant.py runs/v21/more2 runs/v21/pkg_more2
    diffmem testbed quality --model runs/v21/pkg_more2/pipeline --out runs/v21/q_more2

Shipping it is copying DEST over src/diffmem/testbed/weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed import WEIGHTS, weights_dir
from diffmem.testbed.recipe import model_defaults, save_testbed, shipped_recipe


def chain(work: Path) -> list[dict]:
    """The stage-2 runs behind a variant, first to last (a run started from another variant follows it)."""
    run = json.loads((work / "variant.json").read_text())
    before = chain(Path(run["init"])) if run["init"] not in ("base", "shipped") else []
    named = {"base": "the stage-1 base", "shipped": "testbed v2's stage 2 (the recipe above)"}
    return [*before, {**run, "init": named.get(run["init"], run["init"]), "work": str(work)}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="the variant's work folder")
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    if not (args.work / "variant.json").is_file() or not (args.work / "pipeline").is_dir():
        ap.error(f"{args.work}: not a finished variant (no variant.json or pipeline/)")
    quiet_diffusers()
    cfg = shipped_recipe()
    pipe = load_pipeline(str(args.work / "pipeline"), device="cpu", dtype=torch.float32)
    pipe.to(torch.float16).to(torch.float32)  # what users load
    defaults = model_defaults(pipe, cfg.splits(), cfg)
    shipped = json.loads((WEIGHTS / "recipe.json").read_text())
    save_testbed(pipe, weights_dir(base=True) / "diffusion_pytorch_model.safetensors", args.dest, cfg,
                 shipped.get("timings", {}), defaults)
    record = json.loads((args.dest / "recipe.json").read_text())
    record["stage2_runs"] = [*shipped.get("stage2_runs", []), *chain(args.work)]
    (args.dest / "recipe.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"dest": str(args.dest), "target_loss": defaults.target_loss,
                      "stage2_runs": record["stage2_runs"]}, indent=1))


if __name__ == "__main__":
    main()
