"""The testbed's demo and quality runs: scores, tables, plots and pictures written to an output folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.io.durable import write_atomic
from diffmem.measures.detection import evaluate_scores
from diffmem.measures.plots import plot_histogram, plot_roc
from diffmem.models.attention import collapsed_t5_rows
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.figures import copy_grid
from diffmem.testbed.quality import denoising_loss, generate, quality_report
from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import Item, render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity


def _console():
    from rich.console import Console

    return Console(stderr=False)


def picture(pipe, memorized: list[Item], heldout: list[Item], path: Path, generations: int = 4) -> Path:
    """Training image | generations for memorized prompts, nearest planted image | generations for held-out."""
    from diffmem.models.defaults import ModelDefaults

    items = memorized + heldout
    imgs, _ = generate(pipe, [i.caption for i in items], generations=generations)
    own = render_many([i.scene for i in memorized], [i.seed for i in memorized])
    rows = []
    for k, item in enumerate(memorized):
        rows.append((f"memorized #{item.index}", own[k], imgs[k], copy_similarity(imgs[k], own[k : k + 1])[:, 0]))
    for k, item in enumerate(heldout):
        gens = imgs[len(memorized) + k]
        sims = copy_similarity(gens, own)
        best = int(sims.max(axis=0).argmax())
        rows.append((f"held-out #{item.index}\n(nearest: #{memorized[best].index})", own[best], gens, sims[:, best]))
    return copy_grid(rows, path, COPY_THRESHOLD,
                     title=f"testbed: training image and {generations} seeds (DDIM 50, guidance "
                           f"{ModelDefaults.of(pipe).guidance_scale:g}); copy >= {COPY_THRESHOLD:.2f}")


def run_demo(out: Path, generations: int = 4, progress_factory: Callable | None = None) -> dict:
    """Detect the testbed's labelled prompts (first step), print the AUC table, write plots and a picture."""
    from rich.table import Table

    quiet_diffusers()
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    console = _console()
    pipe = load_pipeline("testbed", device="cpu")
    splits = shipped_recipe().splits()
    labelled = [(i, 1) for i in splits.planted] + [(i, 0) for i in splits.heldout]
    det = MagnitudeDetector(pipe, steps="first", generations=generations, batch_size=256)
    results = []
    with progress_factory() if progress_factory else _null() as bar:
        task = bar.add_task("first-step detection", total=len(labelled)) if bar else None
        for res in det.iter_scores([i.caption for i, _ in labelled]):
            results.append(res)
            if bar:
                bar.advance(task)
    rows: list[dict[str, Any]] = []
    for (item, label), res in zip(labelled, results, strict=True):
        rows.append({"prompt": item.caption, "label": label, "index": item.index,
                     "score_n1": res.magnitudes[0][0], f"score_n{generations}": res.score})
    write_atomic(out / "detections.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    table = Table(title=f"testbed: {len(splits.planted)} memorized vs {len(splits.heldout)} held-out prompts, "
                        "first step (TPR: highest at FPR <= target)")
    for col in ("setting", "AUC", "TPR@1%FPR", "TPR@3%FPR", "threshold@1%FPR"):
        table.add_column(col)
    summary: dict[str, Any] = {}
    for key, name in (("score_n1", "first step, n=1"), (f"score_n{generations}", f"first step, n={generations}")):
        pos = [r[key] for r in rows if r["label"] == 1]
        neg = [r[key] for r in rows if r["label"] == 0]
        ev = evaluate_scores(pos, neg)
        summary[name] = ev.to_dict()
        table.add_row(name, f"{ev.auc:.4f}", f"{ev.tpr_at_1fpr:.3f}", f"{ev.tpr_at_3fpr:.3f}", f"{ev.threshold:.3f}")
        if key != "score_n1":
            plot_roc(pos, neg, out / "roc.png", title=f"testbed, {name}")
            plot_histogram(pos, neg, out / "scores.png", threshold=ev.threshold)
    console.print(table)
    picture(pipe, splits.planted[:4], splits.heldout[:4], out / "copies.png")
    summary["wall_s"] = round(time.time() - t0, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    console.print(f"wrote detections.jsonl, roc.png, scores.png, copies.png, summary.json to {out.resolve()}")
    return summary


def run_quality(out: Path, generations: int = 4, steps: int = 50, guidance: float | None = None, batch_size: int = 256,
                progress_factory: Callable | None = None, model: str = "testbed", n_heldout: int | None = None,
                device: Any = "cpu") -> dict:
    """Generate for every memorized and (the first `n_heldout`) held-out prompts of the testbed's ground truth with
    `model` (the testbed or a variant of it, e.g. a mitigated stage 2); write quality.json, ROC plots, a picture."""
    quiet_diffusers()
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model, device=device, dtype=torch.float32)  # the testbed's figures are float32's
    splits = shipped_recipe().splits()
    with collapsed_t5_rows(pipe):  # exact, and several times faster on testbed-sd3 (METHOD.md section 8)
        tasks: dict[str, int] = {}
        with progress_factory() if progress_factory else _null() as bar:
            def progress(stage: str, i: int, n: int) -> None:
                if bar is None:
                    return
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"generating {stage}", total=n)
                bar.update(tasks[stage], completed=i)

            rep = quality_report(pipe, splits, n_heldout=n_heldout, generations=generations, steps=steps,
                                 guidance=guidance, batch_size=batch_size, progress=progress)
        arrays = rep.pop("_arrays")
        guidance = rep["guidance"]
        rep["vae_psnr_db"] = vae_psnr(pipe, splits.heldout)
        # One forward per item, so the loss always covers every held-out item, whatever `n_heldout` generates.
        rep["heldout_denoising_loss"] = denoising_loss(pipe, splits.heldout)
        rep["heldout_denoising_items"] = len(splits.heldout)
        rep["model"] = model
        rep["settings"] = {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "guidance": guidance,
                           "generations": generations}
        rep["wall_s"] = round(time.time() - t0, 1)
        np.savez_compressed(out / "magnitudes.npz", memorized=arrays["mem_mags"], heldout=arrays["held_mags"],
                            seen_once=arrays["once_mags"])
        mm, hm = arrays["mem_mags"], arrays["held_mags"]
        plot_roc(mm[:, 0, 0], hm[:, 0, 0], out / "roc_first_n1.png", title=f"{model}, first step, n=1")
        plot_roc(mm[:, :, 0].mean(1), hm[:, :, 0].mean(1), out / "roc_first_n4.png", title=f"{model}, first step, n=4")
        plot_roc(mm.mean((1, 2)), hm.mean((1, 2)), out / "roc_all_n4.png", title=f"{model}, all steps, n=4")
        picture(pipe, splits.planted[:6], splits.heldout[:6], out / "copies.png")
    write_atomic(out / "quality.json", json.dumps(rep, indent=2))
    _console().print_json(json.dumps(rep))
    return rep


def vae_psnr(pipe, items: list[Item]) -> float:
    """Mean PSNR (dB) of the VAE round trip (encode mean, decode) on renders of `items`."""
    from diffmem.testbed.model import vae_roundtrip

    imgs = render_many([i.scene for i in items], [i.seed for i in items])
    mse = ((vae_roundtrip(pipe.vae, imgs) - imgs) ** 2).mean(axis=(1, 2, 3))
    return float((10 * np.log10(1 / mse)).mean())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
