"""Were the training images that held-out prompts copy shown more often, or more recently, than their peers?

Reads a `diffmem testbed quality` report (its `heldout_copied_training_items`) and the model's recipe.json (the
shipped recipe and, for a packaged variant, its chain of stage-2 continuations, `stage2_runs`), replays the
batch draws (`stage1_picks`, `stage2_picks`; no latents needed) and counts how often each stage-1 item was shown
in pretraining, replayed in the shipped stage 2 and in the continuations. The copied items are compared with all
stage-1 renderings of the held-out captions, the pool a held-out prompt's copy comes from. Usage (issue #31,
DATA.md):

    python tools/copy_recency.py runs/v21/q_lean2/quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffmem.errors import InputError
from diffmem.io.files import read_json_object
from diffmem.testbed import WEIGHTS
from diffmem.testbed.recipe import RecipeConfig, shipped_recipe, stage1_picks, stage2_picks


def replay_counts(cfg: RecipeConfig, sizes: list[int], first: int, steps: int) -> np.ndarray:
    """How often stage 2's steps first..first+steps-1 under `cfg` replay each stage-1 item."""
    picks = stage2_picks(sizes, cfg)
    counts = np.zeros(sizes[3], dtype=np.int64)
    for step in range(first, first + steps):
        np.add.at(counts, picks(step)[3].numpy(), 1)
    return counts


def stage1_counts(cfg: RecipeConfig, n_items: int) -> np.ndarray:
    """How often stage 1 (pretraining) shows each of its items."""
    picks = stage1_picks(n_items, cfg)
    counts = np.zeros(n_items, dtype=np.int64)
    for step in range(cfg.stage1_steps):
        np.add.at(counts, picks(step).numpy(), 1)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality", type=Path, help="quality.json of `diffmem testbed quality`")
    args = ap.parse_args()
    try:
        rep = read_json_object(args.quality, "a quality report")
        copied = rep["heldout_copied_training_items"]
    except (InputError, KeyError) as e:
        ap.error(f"{args.quality}: not a quality report with heldout_copied_training_items ({str(e)[:120]})")
    folder = WEIGHTS if rep.get("model") == "testbed" else Path(str(rep.get("model"))).parent
    cfg = shipped_recipe(folder)
    runs = read_json_object(folder / "recipe.json", "a recipe").get("stage2_runs", [])
    splits = cfg.splits()
    sizes = [len(splits.planted), len(splits.anchors), len(splits.stage2_unique), len(splits.stage1)]
    parts = {"stage 1": stage1_counts(cfg, len(splits.stage1)),
             "shipped stage 2": replay_counts(cfg, sizes, 0, cfg.stage2_steps)}
    for run in runs:
        over = [f"{k}={v}" for k, v in run["set"].items()]
        parts[f"continuation after {run['after']}"] = replay_counts(cfg.with_overrides(over), sizes, run["after"],
                                                                    run["steps"])
    held = {i.caption for i in splits.heldout}
    pool = np.array([i.caption in held for i in splits.stage1])  # renderings of held-out captions
    stage1 = np.array([k for k in copied if k < len(splits.stage1)], dtype=np.int64)
    out: dict = {"model": rep.get("model"), "copied_items": len(copied), "copied_stage1_items": len(stage1),
                 "pool_items": int(pool.sum())}
    for name, counts in parts.items():
        out[name] = {"copied: mean shows": float(counts[stage1].mean()) if len(stage1) else None,
                     "copied: share shown": float((counts[stage1] > 0).mean()) if len(stage1) else None,
                     "pool: mean shows": float(counts[pool].mean()),
                     "pool: share shown": float((counts[pool] > 0).mean())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
