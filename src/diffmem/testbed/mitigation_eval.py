"""Measure inference-time mitigation on the testbed: memorization rate, alignment and cost per method.

Every method generates the memorized prompts from the same initial noises as the unmitigated run (DDIM, 4
seeds); a prompt counts as memorized when at least 2 of its generations copy its training image (the quality
report's criterion). The embedding optimisation's target loss is swept to draw the trade-off curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.mitigate import generate
from diffmem.testbed.figures import copy_grid
from diffmem.testbed.quality import alignment
from diffmem.testbed.scenes import Item, render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, own_similarity


def _images(result_images: list[Any]) -> np.ndarray:
    """The pipeline's per-prompt (G, H, W, 3) arrays as one (N, G, 3, H, W) array."""
    return np.stack([np.moveaxis(np.asarray(img), -1, 1) for img in result_images])


def measure(pipe, items: Sequence[Item], method: str, own: np.ndarray, **settings: Any) -> dict[str, Any]:
    """Generate `items` with one method; memorization rate, alignment, time per prompt, and the images."""
    res = generate(pipe, [i.caption for i in items], method, **settings)
    imgs = _images(res.images)
    sims = own_similarity(imgs, own)
    copies = (sims >= COPY_THRESHOLD).sum(axis=1)
    ok = alignment(imgs, list(items))
    return {
        "method": method,
        "memorization_rate": float((copies >= 2).mean()),
        "memorized_any_seed": float((copies >= 1).mean()),
        "mean_copy_similarity": float(sims.mean()),
        "aligned": None if ok is None else float(ok.mean()),
        "seconds_per_prompt": float(np.mean([d.seconds for d in res.decisions])),
        "mean_final_loss": float(np.mean([d.final_loss for d in res.decisions if d.final_loss is not None])),
        "target_reached": (None if method != "embedding"
                           else float(np.mean([bool(d.reached) for d in res.decisions]))),
        "_images": imgs,
        "_sims": sims,
    }


def mitigation_report(pipe, items: Sequence[Item], out: Path, target_loss: float,
                      sweep: Sequence[float], methods: Sequence[str] = ("none", "embedding", "rta", "rna", "cwr",
                                                                          "gni"),
                      generations: int = 4, seed: int = 0, steps: int = 50, iters: int = 10, lr: float = 0.05,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One row per method at `target_loss`, the embedding method at each target of `sweep`, and a picture."""
    say = progress or (lambda msg: None)
    own = render_many([i.scene for i in items], [i.seed for i in items])
    common = dict(generations=generations, seed=seed, num_inference_steps=steps, iters=iters, lr=lr)
    rows, images = [], {}
    for method in methods:
        say(f"method {method}")
        row = measure(pipe, items, method, own, target_loss=target_loss, **common)
        images[method] = (row.pop("_images"), row.pop("_sims"))
        rows.append(row)
    curve = []
    for target in sweep:
        say(f"embedding, target loss {target:g}")
        row = measure(pipe, items, "embedding", own, target_loss=target, **common)
        row.pop("_images"), row.pop("_sims")
        curve.append({"target_loss": target, **row})
    out.mkdir(parents=True, exist_ok=True)
    _plot_tradeoff(rows, curve, out / "tradeoff.png")
    if "none" in images and "embedding" in images:
        _picture(items, own, images["none"], images["embedding"], out / "mitigation.png")
    from diffmem.loading import default_guidance

    settings = {**common, "guidance": default_guidance(pipe)}
    return {"n_prompts": len(items), "target_loss": target_loss, "settings": settings,
            "methods": rows, "tradeoff": curve}


def _plot_tradeoff(rows: list[dict], curve: list[dict], path: Path) -> None:
    """Memorization rate against alignment: the embedding method as its target loss moves, baselines as points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4))
    ax = fig.subplots()
    ax.plot([c["aligned"] for c in curve], [c["memorization_rate"] for c in curve], "o-", label="embedding (sweep)")
    for c in curve:
        ax.annotate(f"{c['target_loss']:g}", (c["aligned"], c["memorization_rate"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for r in rows:
        ax.plot(r["aligned"], r["memorization_rate"], "s", label=r["method"])
    ax.set_xlabel("alignment with the caption (share of generations)")
    ax.set_ylabel("memorization rate (share of prompts)")
    ax.set_title("testbed: mitigation trade-off (labels: target loss)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _picture(items: Sequence[Item], own: np.ndarray, plain: tuple[np.ndarray, np.ndarray],
             mitigated: tuple[np.ndarray, np.ndarray], path: Path, n: int = 4) -> None:
    """Training image | unmitigated generations, then training image | mitigated generations, for n prompts."""
    rows = []
    for k in range(min(n, len(items))):
        rows.append((f"#{items[k].index} plain", own[k], plain[0][k], plain[1][k]))
        rows.append((f"#{items[k].index} mitigated", own[k], mitigated[0][k], mitigated[1][k]))
    copy_grid(rows, path, COPY_THRESHOLD, title="testbed: training image, unmitigated and mitigated generations")
