"""Quick evaluation of a testbed candidate, used to choose the stage-2 mix and the default guidance scale.

Cheaper than `diffmem testbed quality` (2 seeds, fewer prompts, DDIM 25 by default), with the same instruments:
first-step AUC and TPR@1%FPR (n=1 and 4) memorized vs held-out and vs seen-once; per guidance scale the share of
memorized generations that copy (triggered / untriggered apart), triggered prompts without their trigger, held-out
prompts one attribute from a planted caption ("near") and the rest ("far") that copy any training image, and
held-out alignment. Results: DATA.md, "Recipe v2". Usage:

    python tools/testbed_quick_eval.py PIPELINE_DIR [--recipe runs/testbed/recipe.json] \
        [--set n_planted=64 ...] [--guidance 1.5,2.5,4,7.5] [--seeds 2] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.errors import InputError
from diffmem.measures.detection import roc_auc, tpr_at_fpr
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.alignment import aligned, attribute_accuracy
from diffmem.testbed.quality import best_copy, generate
from diffmem.testbed.recipe import RecipeConfig, shipped_recipe
from diffmem.testbed.scenes import Item, render_items
from diffmem.testbed.similarity import COPY_THRESHOLD, own_similarity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("--recipe", default=None, help="recipe.json of the run's work folder (default: the shipped one)")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides the candidate was trained with")
    ap.add_argument("--guidance", default="1.5,2.5,4,7.5")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    quiet_diffusers()
    cfg = RecipeConfig(**json.loads(Path(args.recipe).read_text())) if args.recipe else shipped_recipe()
    try:
        cfg = cfg.with_overrides(args.set)
    except InputError as e:
        ap.error(str(e))
    over = dict(kv.split("=", 1) for kv in args.set)
    sp = cfg.splits()
    pipe = load_pipeline(args.pipeline, device="cpu")
    t0 = time.time()
    res: dict = {"model": args.pipeline, "overrides": over}

    det = MagnitudeDetector(pipe, generations=4, batch_size=256)

    def first_step(items: list[Item]) -> np.ndarray:
        return np.array([r.magnitudes for r in det.score([i.caption for i in items])])[..., 0]

    trig = [i for i in sp.planted if i.scene.trigger]
    untrig = [Item(i.index, i.scene.replace(trigger=None), i.seed) for i in trig]
    mem, held, once = first_step(sp.planted), first_step(sp.heldout), first_step(sp.stage2_unique[:512])
    for n in (1, 4):
        m, h, o = mem[:, :n].mean(1), held[:, :n].mean(1), once[:, :n].mean(1)
        res[f"auc_n{n}"], res[f"tpr1_n{n}"] = round(roc_auc(m, h), 4), round(tpr_at_fpr(m, h, 0.01), 3)
        res[f"auc_vs_seen_once_n{n}"] = round(roc_auc(m, o), 4)
    res["auc_triggerless_vs_heldout_n4"] = round(roc_auc(first_step(untrig).mean(1), held.mean(1)), 4)

    near = sp.heldout_near_planted()
    plant = list(dict.fromkeys(trig + sp.planted))[:96]
    h_near = [h for h, k in zip(sp.heldout, near, strict=True) if k][:64]
    h_far = [h for h, k in zip(sp.heldout, near, strict=True) if not k][:32]
    targets = render_items(sp.planted + sp.anchors)
    own_p, own_t = render_items(plant), render_items(trig)
    ntrig = len(trig)
    for g in (float(x) for x in args.guidance.split(",")):
        prompts = [i.caption for i in plant + untrig + h_near + h_far]
        imgs, _ = generate(pipe, prompts, generations=args.seeds, guidance=g, steps=args.steps)
        a, b = len(plant), len(plant) + len(untrig)
        sim_p, sim_t = own_similarity(imgs[:a], own_p), own_similarity(imgs[a:b], own_t)
        held_imgs, hitems = imgs[b:], h_near + h_far
        bc = best_copy(held_imgs, targets)
        flat = held_imgs.reshape(-1, *held_imgs.shape[2:])
        scenes = [h.scene for h in hitems for _ in range(args.seeds)]
        al = np.asarray(aligned(flat, scenes))
        res[f"g{g:g}"] = {
            "memorized_copy_per_generation": round(float((sim_p >= COPY_THRESHOLD).mean()), 3),
            "triggered_copy_per_generation": round(float((sim_p[:ntrig] >= COPY_THRESHOLD).mean()), 3),
            "untriggered_copy_per_generation": round(float((sim_p[ntrig:] >= COPY_THRESHOLD).mean()), 3),
            "triggerless_copy_per_generation": round(float((sim_t >= COPY_THRESHOLD).mean()), 3),
            "heldout_near_copy_any": round(float((bc[: len(h_near)] >= COPY_THRESHOLD).any(1).mean()), 3),
            "heldout_far_copy_any": round(float((bc[len(h_near):] >= COPY_THRESHOLD).any(1).mean()), 3),
            "heldout_aligned": round(float(al.mean()), 3),
            "heldout_attributes": {k: round(v, 3) for k, v in attribute_accuracy(flat, scenes).items()},
        }
        print(json.dumps({f"g{g:g}": res[f"g{g:g}"]}), flush=True)
    res["eval_s"] = round(time.time() - t0)
    print(json.dumps(res))
    out = Path(args.pipeline).parent / f"quick_eval_{args.guidance.replace(',', '_')}.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
