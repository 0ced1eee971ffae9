"""Measure inference-time mitigation on the testbed: memorization rate, alignment and cost per method.

Every method generates the memorized prompts from the same initial noises as the unmitigated run (DDIM, 4
seeds); a prompt counts as memorized when at least 2 of its generations copy its training image (the quality
report's criterion). The embedding optimisation's target loss is swept to draw the trade-off curve. Each
measurement is written to OUT/parts/ as it finishes, so a rerun with the same settings resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import InputError
from diffmem.io.durable import replace_file, save_figure, write_atomic
from diffmem.io.files import read_json_object, read_user_json
from diffmem.mitigate import generate
from diffmem.mitigate.base import MITIGATIONS, table_methods
from diffmem.testbed.figures import copy_grid
from diffmem.testbed.quality import alignment
from diffmem.testbed.scenes import Item, paraphrases, render_many
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


class Parts:
    """Finished measurements of one evaluation in `out/parts/`: a rerun with the same settings reuses them (rows
    as JSON, images where the picture needs them as .npy), a rerun with other settings is refused."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.dir = Path(out) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "settings.json"
        if read_user_json(stamp, "resume stamp", missing=None) not in (None, settings):
            raise InputError(f"{out} holds a mitigation evaluation with other settings: use the same options to "
                             "resume it, or another --out")
        write_atomic(stamp, json.dumps(settings, indent=2, sort_keys=True))

    def row(self, key: str, measure: Callable[[], dict[str, Any]], images: bool = False) -> dict[str, Any]:
        """The stored row `key`, else `measure()` stored (with its `_images` and `_sims` when `images`)."""
        path = self.dir / f"{key}.json"
        if path.is_file() and (not images or (self.dir / f"{key}_images.npy").is_file()):
            row = read_json_object(path, "stored evaluation row")
            if images:
                row |= {"_images": np.load(self.dir / f"{key}_images.npy"),
                        "_sims": np.load(self.dir / f"{key}_sims.npy")}
            return row
        row = measure()
        if images:
            for part in ("images", "sims"):
                replace_file(self.dir / f"{key}_{part}.npy", partial(_save_npy, array=row[f"_{part}"]))
        write_atomic(path, json.dumps({k: v for k, v in row.items() if not k.startswith("_")}))
        return row


#: Strengths of each baseline swept for the trade-off figure: words inserted (RTA, RNA, CWR), noise sigma (GNI).
BASELINE_STRENGTHS: dict[str, Sequence[float]] = {"rta": (1, 2, 4, 8), "rna": (1, 2, 4, 8), "cwr": (1, 2, 4, 8),
                                                    "gni": (0.1, 0.3, 1.0, 3.0)}


def write_paraphrases(items: Sequence[Item], out: Path) -> Path:
    """OUT/paraphrases.json: each caption's paraphrases from the testbed's grammar (PRSS's `--paraphrases`)."""
    path = Path(out) / "paraphrases.json"
    write_atomic(path, json.dumps({i.caption: paraphrases(i.scene) for i in items}, indent=2))
    return path


def parse_methods(text: str) -> tuple[str, ...] | None:
    """`--methods`: comma-separated registered names, `all` (every method the testbed can run: it supplies PRSS's
    paraphrases), or empty (None: Wen et al.'s table)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        return None
    if names == ["all"]:
        return (*table_methods(), *(n for n, cls in MITIGATIONS.items() if cls.needs and not cls.plain))
    for name in names:
        MITIGATIONS.lookup(name, "--methods")
    return tuple(dict.fromkeys(names))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A measurement without its images."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _strength(method: str, value: float) -> dict[str, Any]:
    """The keyword that sets a baseline's strength."""
    return {"sigma": float(value)} if method == "gni" else {"k": int(value)}


def mitigation_report(pipe, items: Sequence[Item], out: Path, target_loss: float,
                      sweep: Sequence[float], methods: Sequence[str] | None = None,
                      generations: int = 4, seed: int = 0, steps: int = 50, iters: int = 10, lr: float = 0.05,
                      strengths: dict[str, Sequence[float]] | None = None,
                      progress: Callable[[str], None] | None = None, parts: Parts | None = None) -> dict[str, Any]:
    """One row per method (default: Wen et al.'s table) at its default strength (the embedding method at
    `target_loss`), the embedding method at each target of `sweep` and each baseline at each of its `strengths`
    (the trade-off figure), and a picture.
    Measurements go to `parts` (default: out/parts/ for these settings) as they finish."""
    say = progress or (lambda msg: None)
    methods = table_methods(paper=True) if methods is None else methods
    own = render_many([i.scene for i in items], [i.seed for i in items])
    common = dict(generations=generations, seed=seed, num_inference_steps=steps, iters=iters, lr=lr)
    sweeps = BASELINE_STRENGTHS if strengths is None else strengths
    parts = parts or Parts(out, {"prompts": [i.caption for i in items], "target_loss": target_loss, **common})
    rows, images = [], {}
    for method in methods:
        say(f"method {method}")
        extra = {"method_options": {"paraphrases": str(write_paraphrases(items, out))}} if method == "prss" else {}
        row = parts.row(method, partial(measure, pipe, items, method, own, target_loss=target_loss, **common,
                                        **extra), images=True)
        images[method] = (row.pop("_images"), row.pop("_sims"))
        rows.append(row)
    curves: dict[str, list[dict[str, Any]]] = {"embedding": []}
    for target in sweep:
        say(f"embedding, target loss {target:g}")
        row = parts.row(f"embedding_target_{target:.6g}",
                        partial(measure, pipe, items, "embedding", own, target_loss=target, **common))
        curves["embedding"].append({"strength": target, **_public(row)})
    for method, values in sweeps.items():
        curves[method] = []
        for value in values:
            say(f"{method}, strength {value:g}")
            row = parts.row(f"{method}_strength_{value:g}", partial(
                measure, pipe, items, method, own, target_loss=target_loss, **_strength(method, value), **common))
            curves[method].append({"strength": value, **_public(row)})
    _plot_tradeoff(rows, curves, out / "tradeoff.png")
    if "none" in images and "embedding" in images:
        _picture(items, own, images["none"], images["embedding"], out / "mitigation.png")
    from diffmem.models.defaults import ModelDefaults

    settings = {**common, "guidance": ModelDefaults.of(pipe).guidance_scale}
    return {"n_prompts": len(items), "target_loss": target_loss, "settings": settings,
            "methods": rows, "tradeoff": curves}


def guard_report(pipe, memorized: Sequence[Item], heldout: Sequence[Item], threshold: float, target_loss: float,
                 generations: int = 4, seed: int = 0, steps: int = 50, iters: int = 10, lr: float = 0.05,
                 identical_check: int = 64, progress: Callable[[str], None] | None = None,
                 parts: Parts | None = None) -> dict[str, Any]:
    """The guard end to end (`generate --guard`): memorized and held-out prompts generated with the embedding
    mitigation applied to those scoring >= `threshold`. Memorization rate, flagged shares (false flags on the
    held-out prompts), alignment, and whether unflagged prompts gave the plain pipeline's images bit for bit
    (checked on the first `identical_check` prompts of each set against a plain generation)."""
    say = progress or (lambda msg: None)
    common = dict(generations=generations, seed=seed, num_inference_steps=steps, iters=iters, lr=lr,
                  target_loss=target_loss)
    result: dict[str, Any] = {"threshold": threshold, "target_loss": target_loss}
    for name, items in (("memorized", list(memorized)), ("heldout", list(heldout))):
        say(f"guard, {name} prompts")

        run = partial(_guard_part, pipe, name, items, threshold, common, identical_check, say)
        result[name] = run() if parts is None else parts.row(f"guard_{name}_{threshold:.6g}", run)
    return result


def _guard_part(pipe, name: str, items: list[Item], threshold: float, common: dict[str, Any], identical_check: int,
                say: Callable[[str], None]) -> dict[str, Any]:
    """The guard on one prompt set (`guard_report`'s row for it)."""
    guarded = generate(pipe, [i.caption for i in items], "embedding", threshold=threshold, **common)
    imgs = _images(guarded.images)
    flagged = np.array([bool(d.flagged) for d in guarded.decisions])
    ok = alignment(imgs, items)
    part: dict[str, Any] = {"n": len(items), "flagged": float(flagged.mean()),
                            "aligned": None if ok is None else float(ok.mean()),
                            "seconds_per_prompt": float(np.mean([d.seconds for d in guarded.decisions]))}
    if name == "memorized":
        own = render_many([i.scene for i in items], [i.seed for i in items])
        copies = (own_similarity(imgs, own) >= COPY_THRESHOLD).sum(axis=1)
        part |= {"memorization_rate": float((copies >= 2).mean()),
                 "memorized_among_unflagged": float((copies[~flagged] >= 2).mean()) if (~flagged).any() else None,
                 "unflagged_share_plus_10_points": float((~flagged).mean()) + 0.10}
    check = [k for k in range(min(identical_check, len(items))) if not flagged[k]]
    if check:
        say(f"plain generation of {len(check)} unflagged {name} prompts")
        plain = _images(generate(pipe, [items[k].caption for k in check], "none", **common).images)
        part["unflagged_bit_identical"] = bool(all(np.array_equal(plain[j], imgs[k]) for j, k in enumerate(check)))
        part["unflagged_checked"] = len(check)
    return part


def _plot_tradeoff(rows: list[dict], curves: dict[str, list[dict]], path: Path) -> None:
    """Memorization rate against alignment: each method as its strength moves (labels: the strength), and the
    unmitigated generations as a point."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for method, curve in curves.items():
        ax.plot([c["aligned"] for c in curve], [c["memorization_rate"] for c in curve], "o-", ms=4,
                label=f"{method} ({'target loss' if method == 'embedding' else 'sigma' if method == 'gni' else 'k'})")
        for c in curve:
            ax.annotate(f"{c['strength']:g}", (c["aligned"], c["memorization_rate"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    for r in rows:
        if r["method"] == "none":
            ax.plot(r["aligned"], r["memorization_rate"], "k*", ms=10, label="no mitigation")
    ax.set_xlabel("alignment with the caption (share of generations)")
    ax.set_ylabel("memorization rate (share of prompts)")
    ax.set_title("testbed: memorization against alignment as each mitigation's strength moves", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _picture(items: Sequence[Item], own: np.ndarray, plain: tuple[np.ndarray, np.ndarray],
             mitigated: tuple[np.ndarray, np.ndarray], path: Path, n: int = 4) -> None:
    """Training image | unmitigated generations, then training image | mitigated generations, for n prompts."""
    rows = []
    for k in range(min(n, len(items))):
        rows.append((f"#{items[k].index} plain", own[k], plain[0][k], plain[1][k]))
        rows.append((f"#{items[k].index} mitigated", own[k], mitigated[0][k], mitigated[1][k]))
    copy_grid(rows, path, COPY_THRESHOLD, title="testbed: training image, unmitigated and mitigated generations")


def _save_npy(path: Path, array: Any) -> None:
    """`np.save` to exactly `path` (np.save given a name adds .npy to it)."""
    with path.open("wb") as f:
        np.save(f, array)
