"""`diffmem testbed ...`: train the testbed, write its labelled prompts, measure it, run the demo."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(help="The bundled testbed model: training, ground truth, quality figures, demo.",
                  no_args_is_help=True)


class Split(str, Enum):
    memorized = "memorized"
    heldout = "heldout"
    seen_once = "seen-once"


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False)


@app.command()
def train(
    work: Path = typer.Option(Path("runs/testbed"), help="Working folder: checkpoints, caches, logs (resumable)."),
    dest: Path = typer.Option(None, help="Where to write the trained testbed (default: the package's weights)."),
    seed: int = typer.Option(0, help="Seed of the data splits, initialisation and training order."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Rebuild the testbed from scratch: VAE, stage 1 (base model), stage 2 (planted duplicates)."""
    from diffmem.testbed import WEIGHTS
    from diffmem.testbed.recipe import RecipeConfig, run_recipe

    cfg = RecipeConfig(seed=seed)
    tasks: dict[str, int] = {}
    with _progress() as bar:
        def progress(stage: str, i: int, n: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=n)
            bar.update(tasks[stage], completed=i)

        timings = run_recipe(cfg, work, dest or WEIGHTS, device=device, progress=progress)
    typer.echo(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    typer.echo(f"testbed written to {dest or WEIGHTS}")


@app.command()
def prompts(
    split: Split = typer.Option(..., help="memorized (planted duplicates), heldout (never trained on) or "
                                "seen-once (unique fine-tuning items)."),
    out: Path = typer.Option(..., help="Output .jsonl: prompt, split, label, index, trigger."),
    limit: int = typer.Option(None, help="Write at most this many prompts."),
) -> None:
    """Write the testbed's labelled evaluation prompts (ground truth) as JSONL."""
    from diffmem.testbed.recipe import shipped_recipe

    cfg = shipped_recipe()
    rows = labelled_prompts(cfg.splits(), split.value, cfg.n_seen_once)[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(f"wrote {len(rows)} {split.value} prompts to {out}")


def labelled_prompts(splits, split: str, n_seen_once: int) -> list[dict]:
    """Rows for one split: the caption as `prompt`, `label` 1 for memorized, the training item's `index`."""
    items = {"memorized": splits.planted, "heldout": splits.heldout,
             "seen-once": splits.stage2_unique[:n_seen_once]}[split]
    return [
        {"prompt": i.caption, "split": split, "label": int(split == "memorized"),
         "index": i.index if split != "heldout" else None, "trigger": i.scene.trigger}
        for i in items
    ]


@app.command()
def quality(
    out: Path = typer.Option(Path("out/quality"), help="Output folder for quality.json and pictures."),
    generations: int = typer.Option(4, help="Seeds per prompt."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance: float = typer.Option(7.5, help="Guidance scale."),
    batch_size: int = typer.Option(256, help="Images per pipeline call."),
) -> None:
    """Measure the shipped testbed: reproduction of planted images, held-out copying and alignment, detection."""
    from diffmem.testbed.report import run_quality

    run_quality(out, generations=generations, steps=steps, guidance=guidance, batch_size=batch_size,
                progress_factory=_progress)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Output folder."),
    generations: int = typer.Option(4, help="Generations per prompt for detection."),
) -> None:
    """The main job on the bundled testbed: detect its labelled prompts, AUC table, ROC plot, copy picture."""
    from diffmem.testbed.report import run_demo

    run_demo(out, generations=generations, progress_factory=_progress)
