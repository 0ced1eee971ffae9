"""Check explanations on the testbed: deletion test, agreement with leave-one-out, triggers, suggested edits."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from diffmem.detectors.calibration import calibrate_detection
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.explanation.attribution import explain, suggest_edits
from diffmem.testbed.quality import generate
from diffmem.testbed.scenes import Item, render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity


def _without(words: list[str], drop: set[int]) -> str:
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def explain_report(pipe, memorized: list[Item], heldout: list[Item], generations: int = 4, seed: int = 0,
                   max_k: int = 3, progress: Callable[[int, int], None] | None = None) -> dict:
    """Deletion curves (top-k vs random-k words), gradient vs leave-one-out Spearman, trigger rank, and
    how often a suggested edit clears the 1%-FPR threshold and no longer reproduces the training image."""
    settings: dict[str, Any] = dict(steps="first", generations=generations, seed=seed)
    det = MagnitudeDetector(pipe, batch_size=256, **settings)
    threshold = calibrate_detection(det, [i.caption for i in heldout]).threshold  # 1% FPR
    rng = random.Random(seed)
    variants, rhos, suggestions = [], [], []
    trigger_first = {"gradient": 0, "leave-one-out": 0}
    n_trig = 0
    for n, item in enumerate(memorized):
        grad = explain(pipe, item.caption, method="gradient", **settings)
        loo = explain(pipe, item.caption, method="leave-one-out", **settings)
        words = [w.text for w in grad.words]
        g, d = [w.significance for w in grad.words], [w.significance for w in loo.words]
        rhos.append(spearmanr(g, d).statistic)
        if item.scene.trigger:
            n_trig += 1
            for method, attr in (("gradient", grad), ("leave-one-out", loo)):
                trigger_first[method] += int(words[attr.ranking()[0]].strip(",") == item.scene.trigger)
        shuffled = rng.sample(range(len(words)), len(words))
        for method, attr in (("top", grad), ("loo_top", loo)):
            for k in range(1, max_k + 1):
                variants.append((n, method, k, _without(words, set(attr.ranking()[:k]))))
        for k in range(1, max_k + 1):
            variants.append((n, "random", k, _without(words, set(shuffled[:k]))))
        best = suggest_edits(pipe, grad, threshold, max_results=1)
        suggestions.append(best[0].prompt if best else None)
        if progress is not None:
            progress(n + 1, len(memorized))
    base = {r.prompt: r.score for r in det.score([i.caption for i in memorized])}
    scored = det.score([v[3] for v in variants])
    drops: dict[tuple[str, int], list[float]] = {}
    for (n, kind, k, _), res in zip(variants, scored, strict=True):
        drops.setdefault((kind, k), []).append(float(base[memorized[n].caption] or 0) - float(res.score or 0))
    curve = {f"{kind}_{k}": float(np.mean(v)) for (kind, k), v in sorted(drops.items())}
    fixed = _suggestions_fixed(pipe, memorized, suggestions, generations, seed)
    return {
        "n_memorized": len(memorized),
        "threshold_at_1fpr": threshold,
        "deletion_curve": curve,
        "top1_over_random1": curve["top_1"] / curve["random_1"] if curve["random_1"] else float("inf"),
        "loo_top1_over_random1": curve["loo_top_1"] / curve["random_1"] if curve["random_1"] else float("inf"),
        "spearman_gradient_vs_loo": float(np.nanmean(rhos)),
        "trigger_ranked_first": trigger_first["gradient"] / n_trig if n_trig else None,
        "trigger_ranked_first_loo": trigger_first["leave-one-out"] / n_trig if n_trig else None,
        "n_triggered": n_trig,
        "suggestion_found": float(np.mean([s is not None for s in suggestions])),
        "suggestion_clears_and_no_copy": fixed,
        "settings": settings,
    }


def _suggestions_fixed(pipe, memorized: list[Item], suggestions: list[str | None], generations: int,
                       seed: int) -> float:
    """Share of memorized prompts whose best suggestion (below threshold) reproduces the image in no seed."""
    todo = [(k, s) for k, s in enumerate(suggestions) if s is not None]
    if not todo:
        return 0.0
    imgs, _ = generate(pipe, [s for _, s in todo], generations=generations, seed=seed)
    own = render_many([memorized[k].scene for k, _ in todo], [memorized[k].seed for k, _ in todo])
    no_copy = [
        bool((copy_similarity(imgs[j], own[j : j + 1])[:, 0] < COPY_THRESHOLD).all()) for j in range(len(todo))
    ]
    return sum(no_copy) / len(memorized)
