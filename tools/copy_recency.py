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
from typing import Any

import numpy as np

from diffmem.errors import DiffmemError, InputError
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


def read_inputs(quality: Path) -> tuple[RecipeConfig, list[int], list[tuple[RecipeConfig, int, int]], str]:
    """The report's copied items, its model's recipe and stage-2 continuations (recipe, after, steps), its model
    name; anything else is one DiffmemError line."""
    rep = read_json_object(quality, "a quality report")
    copied, model = rep.get("heldout_copied_training_items"), rep.get("model")
    if not isinstance(copied, list) or not all(type(k) is int and k >= 0 for k in copied):
        raise InputError(f"{quality}: heldout_copied_training_items must be a list of item indices")
    if not isinstance(model, str) or not model:
        raise InputError(f"{quality}: no model named")
    folder = WEIGHTS if model == "testbed" else Path(model).parent
    cfg = shipped_recipe(folder)
    runs = read_json_object(folder / "recipe.json", "a recipe").get("stage2_runs", [])
    chain = []
    entries: list[Any] = runs if isinstance(runs, list) else [None]
    for run in entries:
        try:
            over = [f"{k}={v}" for k, v in run["set"].items()]
            after, steps = run["after"], run["steps"]
        except (TypeError, KeyError, AttributeError):
            raise InputError(f"{folder / 'recipe.json'}: a stage2_runs entry lacks set, after or steps") from None
        if not (type(after) is int and type(steps) is int and after >= 0 and steps >= 1):
            raise InputError(f"{folder / 'recipe.json'}: stage2_runs' after and steps must be whole numbers")
        chain.append((cfg.with_overrides(over), after, steps))
    return cfg, copied, chain, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality", type=Path, help="quality.json of `diffmem testbed quality`")
    args = ap.parse_args()
    try:
        cfg, copied, chain, model = read_inputs(args.quality)
    except DiffmemError as e:
        ap.error(str(e)[:300])
    splits = cfg.splits()
    n1 = len(splits.stage1)
    sizes = [len(splits.planted), len(splits.anchors), len(splits.stage2_unique), n1]
    parts = {"stage 1": stage1_counts(cfg, n1), "shipped stage 2": replay_counts(cfg, sizes, 0, cfg.stage2_steps)}
    for run_cfg, after, steps in chain:
        parts[f"continuation after {after}"] = replay_counts(run_cfg, sizes, after, steps)
    held = {i.caption for i in splits.heldout}
    pool = np.array([i.caption in held for i in splits.stage1])  # renderings of held-out captions
    stage1 = np.array([k for k in copied if k < n1], dtype=np.int64)
    out: dict = {"model": model, "copied_items": len(copied), "copied_stage1_items": len(stage1),
                 "pool_items": int(pool.sum())}
    for name, counts in parts.items():
        out[name] = {"copied: mean shows": float(counts[stage1].mean()) if len(stage1) else None,
                     "copied: share shown": float((counts[stage1] > 0).mean()) if len(stage1) else None,
                     "pool: mean shows": float(counts[pool].mean()),
                     "pool: share shown": float((counts[pool] > 0).mean())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
