"""`diffmem testbed ...`: train the testbed, write its labelled prompts, measure it, run the demo."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import ForceOpt, ItersOpt, deprecated_option, renamed

app = typer.Typer(help="The bundled testbed model: training, ground truth, quality figures, demo.",
                  no_args_is_help=True)


SamplingStepsOpt = Annotated[
    int | None, typer.Option("--num-inference-steps", min=1, help="DDIM sampling steps (default 50).")
]
OldSamplingStepsOpt = Annotated[int | None, deprecated_option("--steps", "--num-inference-steps")]


class Split(str, Enum):
    memorized = "memorized"
    heldout = "heldout"
    seen_once = "seen-once"


class Architecture(str, Enum):
    unet = "unet"
    sd3 = "sd3"


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False)


def _device(device: str | None) -> Any:
    """`--device` checked as the top-level CLI checks it; cpu when not given (the testbed's figures are CPU's)."""
    from diffmem.models.loading import parse_device

    return parse_device(device) or "cpu"


TestbedModelOpt = Annotated[str, typer.Option("--model", help="testbed, testbed-sd3, or a folder of a variant "
                                             "trained on the same data (e.g. `testbed stage2`'s).")]


def _testbed_pipeline(device: str | None, model: str = "testbed") -> Any:
    """A testbed in float32 on `--device` (also on CUDA, whose default would be float16)."""
    import torch

    from diffmem.models.loading import load_pipeline

    return load_pipeline(model, device=_device(device), dtype=torch.float32)


@app.command()
def train(
    work: Path = typer.Option(Path("runs/testbed"), help="Working folder: checkpoints, caches, logs (resumable)."),
    dest: Path = typer.Option(None, help="Where to write the trained testbed (default: the package's weights)."),
    seed: int = typer.Option(0, min=0, help="Seed of the data splits, initialisation and training order."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    architecture: Architecture = typer.Option(Architecture.unet, help="unet: the SD 1/2 testbed (VAE, UNet, "
                                              "DDIM); sd3: the SD3 testbed (MMDiT, rectified flow) on the UNet "
                                              "testbed's VAE, text encoder and data."),
) -> None:
    """Rebuild a testbed from scratch: VAE (unet), stage 1 (base model), stage 2 (planted duplicates)."""
    from diffmem.testbed import weights_root
    from diffmem.testbed.recipe import RecipeConfig, run_recipe, sd3_recipe

    cfg = sd3_recipe(seed) if architecture is Architecture.sd3 else RecipeConfig(seed=seed)
    WEIGHTS = weights_root(cfg.architecture)
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
    limit: int = typer.Option(None, min=0, help="Write at most this many prompts."),
    force: ForceOpt = False,
) -> None:
    """Write the testbed's labelled evaluation prompts (ground truth) as JSONL."""
    from diffmem.io.durable import check_output_path, write_atomic
    from diffmem.testbed.recipe import shipped_recipe

    check_output_path(out, "--out", kind="prompt file", force=force)
    cfg = shipped_recipe()
    rows = labelled_prompts(cfg.splits(), split.value, cfg.n_seen_once)[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(f"wrote {len(rows)} {split.value} prompts to {out}")


def labelled_prompts(splits, split: str, n_seen_once: int) -> list[dict]:
    """Rows for one split: the caption as `prompt`, `label` 1 for memorized, the training item's `index`; held-out
    rows say whether their caption is one attribute away from a planted one (`near_planted`)."""
    items = {"memorized": splits.planted, "heldout": splits.heldout,
             "seen-once": splits.stage2_unique[:n_seen_once]}[split]
    rows = [
        {"prompt": i.caption, "split": split, "label": int(split == "memorized"),
         "index": i.index if split != "heldout" else None, "trigger": i.scene.trigger}
        for i in items
    ]
    if split == "heldout":
        for row, near in zip(rows, splits.heldout_near_planted().tolist(), strict=True):
            row["near_planted"] = near
    return rows


@app.command()
def quality(
    out: Path = typer.Option(Path("out/quality"), help="Output folder for quality.json and pictures."),
    generations: int = typer.Option(4, help="Seeds per prompt."),
    num_inference_steps: SamplingStepsOpt = None,
    steps: OldSamplingStepsOpt = None,
    guidance: float = typer.Option(None, help="Guidance scale (default: the model's own)."),
    batch_size: int = typer.Option(256, help="Images per pipeline call."),
    model: TestbedModelOpt = "testbed",
    heldout: int = typer.Option(0, help="Use only the first N held-out prompts (0: all 512)."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu)."),
) -> None:
    """Measure the shipped testbed: reproduction of planted images, held-out copying and alignment, detection."""
    from diffmem.testbed.report import run_quality

    steps = renamed(num_inference_steps, steps, "--steps", "--num-inference-steps", 50)
    run_quality(out, generations=generations, steps=steps, guidance=guidance, batch_size=batch_size,
                progress_factory=_progress, model=model, n_heldout=heldout or None, device=_device(device))


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Output folder."),
    generations: int = typer.Option(4, help="Generations per prompt for detection."),
) -> None:
    """The main job on the bundled testbed: detect its labelled prompts, AUC table, ROC plot, copy picture."""
    from diffmem.testbed.report import run_demo

    run_demo(out, generations=generations, progress_factory=_progress)


@app.command("explain-eval")
def explain_eval(
    out: Path = typer.Option(Path("out/explain"), help="Output folder for explain.json."),
    generations: int = typer.Option(4, help="Initial noises averaged per score."),
    limit: int = typer.Option(0, help="Use only the first N memorized prompts (0: all)."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu)."),
    model: TestbedModelOpt = "testbed",
) -> None:
    """Check explanations on the memorized prompts: deletion test, gradient vs leave-one-out, triggers, edits."""
    from diffmem.models.attention import collapsed_t5_rows
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.explain_eval import explain_report
    from diffmem.testbed.recipe import shipped_recipe

    quiet_diffusers()
    pipe = _testbed_pipeline(device, model)
    splits = shipped_recipe().splits()
    memorized = splits.planted[:limit] if limit else splits.planted
    with _progress() as bar, collapsed_t5_rows(pipe):  # exact, several times faster on testbed-sd3 (METHOD.md s8)
        task = bar.add_task("explaining memorized prompts", total=len(memorized))
        rep = explain_report(pipe, memorized, splits.heldout, generations=generations,
                             progress=lambda i, n: bar.update(task, completed=i))
    out.mkdir(parents=True, exist_ok=True)
    from diffmem.io.durable import write_atomic

    write_atomic(out / "explain.json", json.dumps(rep, indent=2))
    typer.echo(json.dumps(rep, indent=2))
    typer.echo(f"wrote {out / 'explain.json'}")


@app.command()
def mitigation(
    out: Path = typer.Option(Path("out/mitigation"), help="Output folder: frontier.md, frontier.png, "
                             "mitigation.json, picture; parts/ (a rerun with the same options resumes)."),
    target_loss: float = typer.Option(None, help="Target loss of the embedding method (default: the model's "
                                                 "own, derived from its held-out scores)."),
    sweep: str = typer.Option("", help="Comma-separated target losses of the embedding method (the same as "
                                       "--strength embedding=...)."),
    strength: list[str] = typer.Option([], "--strength", help="METHOD=V[,V...]: sweep METHOD over these values "
                                       "of its strength option instead of multiples of its default (repeatable; "
                                       "`--strength none=0` lists each method's option)."),
    strengths: bool = typer.Option(True, "--strengths/--no-strengths",
                                   help="Sweep each method's strength (default: 3-4 multiples of its default); "
                                        "without, only the methods given --strength are swept."),
    heldout: Annotated[int | None, typer.Option(
        "--heldout", min=0, help="Also measure each configuration on the first N held-out prompts (default: 128, "
                                 "or 4x --limit; 0: none); the next N (at most 64) calibrate SAIL and NeMo.")] = None,
    guard: bool = typer.Option(True, "--guard/--no-guard", help="Also run the guard end to end (threshold at "
                               "1% FPR on the held-out prompts) on memorized and held-out prompts."),
    generations: int = typer.Option(4, help="Seeds per prompt."),
    iters: ItersOpt = None,
    num_inference_steps: SamplingStepsOpt = None,
    steps: OldSamplingStepsOpt = None,
    limit: int = typer.Option(0, help="Use only the first N memorized (and 4N held-out) prompts (0: all)."),
    methods: str = typer.Option("", help="Comma-separated mitigations (`diffmem methods`), or 'all' (default: "
                                "Wen et al.'s table: none, embedding, rta, rna, cwr, gni)."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu)."),
    model: TestbedModelOpt = "testbed",
) -> None:
    """The mitigation frontier: memorization rate, alignment (memorized and held-out prompts) and cost over plain
    generation of each method as its strength moves; the table and figure from whatever parts finished; the guard."""
    import numpy as np

    from diffmem.errors import InputError
    from diffmem.mitigate.base import table_methods
    from diffmem.mitigate.embedding import EmbeddingConfig
    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.mitigation_eval import (
        Parts,
        frontier_report,
        guard_report,
        parse_methods,
        parse_strengths,
    )
    from diffmem.testbed.recipe import shipped_recipe

    steps = renamed(num_inference_steps, steps, "--steps", "--num-inference-steps", 50)
    quiet_diffusers()
    chosen = parse_methods(methods)  # every check before any model loads
    given = parse_strengths([*strength, *([f"embedding={sweep}"] if sweep.strip() else [])])
    unused = sorted(set(given) - set(chosen or table_methods(paper=True)))
    if unused:
        raise InputError(f"--strength {unused[0]}: not among --methods")
    budget = EmbeddingConfig() if iters is None else EmbeddingConfig(iters=iters)
    pipe = _testbed_pipeline(device, model)
    splits = shipped_recipe().splits()
    memorized = splits.planted[:limit] if limit else splits.planted
    n_held = heldout if heldout is not None else 4 * limit if limit else 128
    held = splits.heldout[:n_held]
    calibration = splits.heldout[n_held: n_held + min(max(n_held, 2), 64)]
    target = ModelDefaults.of(pipe).resolve_target_loss(target_loss)
    stamp = {"prompts": [i.caption for i in memorized], "heldout": len(held), "target_loss": target,
             "generations": generations, "steps": steps, **({} if iters is None else {"iters": iters})}
    parts = Parts(out, stamp)  # a rerun resumes from these
    rep = frontier_report(pipe, memorized, held, out, target, methods=chosen, strengths=given, sweep=strengths,
                          calibration_prompts=calibration, generations=generations, steps=steps,
                          iters=budget.iters, progress=typer.echo, parts=parts)
    if guard:
        from diffmem.detectors.calibration import calibrate_detection
        from diffmem.detectors.magnitude import MagnitudeDetector

        cal = calibrate_detection(MagnitudeDetector(pipe, generations=generations, batch_size=256),
                                  [i.caption for i in splits.heldout])  # 1% FPR on the held-out prompts
        scores = np.array(cal.scores)
        rep["heldout_score_quantiles"] = {q: float(np.quantile(scores, q)) for q in (0.1, 0.5, 0.9, 0.99)}
        rep["guard"] = guard_report(pipe, memorized, held, cal.threshold, target, generations=generations,
                                    steps=steps, iters=budget.iters, progress=typer.echo, parts=parts)
    from diffmem.io.durable import write_atomic

    write_atomic(out / "mitigation.json", json.dumps(rep, indent=2))
    typer.echo((out / "frontier.md").read_text())
    typer.echo(f"wrote {out / 'mitigation.json'}, frontier.md, frontier.png, mitigation.png")


@app.command()
def oracle(
    model: str = typer.Option("testbed", help="Whose VAE defines the latent space ('testbed' or a folder)."),
    captions: int = typer.Option(200, help="Random captions."),
    renderings: int = typer.Option(16, help="Renderings per caption (different nuisance)."),
) -> None:
    """Model-free upper bound on first-step detection: nuisance energy against caption energy in latent space."""
    from diffmem.models.loading import load_pipeline, quiet_diffusers
    from diffmem.testbed.oracle import oracle_first_step

    quiet_diffusers()
    pipe: Any = load_pipeline(model, device="cpu")
    typer.echo(json.dumps(oracle_first_step(pipe.vae, captions, renderings), indent=2))


@app.command()
def stage2(
    dest: Path = typer.Option(None, help="Where to save the fine-tuned pipeline (diffusers format; required "
                                         "unless --calibrate)."),
    work: Path = typer.Option(Path("runs/stage2"), help="Working folder: latents, checkpoints, log (resumable)."),
    filter_threshold: float = typer.Option(None, help="Drop samples whose magnitude d >= TAU from the loss."),
    filter_at: str = typer.Option("first-step", help="Where the filter measures d: 'first-step' (the first "
                                  "sampling step, the detector's score) or 'train' (each sample's training "
                                  "timestep, the paper's rule)."),
    filter_persist: bool = typer.Option(False, "--filter-persist", help="A caption the filter flags stays out of "
                                        "the loss for the rest of the run."),
    caption_aug: str = typer.Option(None, help="'rta': random token addition to every training caption."),
    rta_tokens: int = typer.Option(4, help="Tokens `--caption-aug rta` inserts."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    train_steps: Annotated[int | None, typer.Option(
        "--train-steps", min=1, help="Train this many optimiser steps instead of the recipe's stage-2 length.")] = None,
    steps: Annotated[int | None, deprecated_option("--steps", "--train-steps")] = None,
    calibrate: bool = typer.Option(False, "--calibrate", help="Do not train: measure d of the base UNet on "
                                   "stage-2 batches and suggest a TAU (as `diffmem train --calibrate`)."),
    separation: bool = typer.Option(False, "--separation", help="Do not train: measure where d separates "
                                    "planted from ordinary samples on the shipped UNet (each rule, timesteps)."),
    architecture: Architecture = typer.Option(Architecture.unet, help="Which shipped testbed: unet (`testbed`) "
                                              "or sd3 (`testbed-sd3`)."),
) -> None:
    """Rerun stage 2 (the memorizing fine-tune) from a shipped testbed's base network, optionally with a
    mitigation."""
    from diffmem.testbed import weights_root
    from diffmem.testbed.recipe import calibrate_stage2, rerun_stage2, shipped_recipe, stage2_separation

    steps = renamed(train_steps, steps, "--steps", "--train-steps")
    arch = architecture.value
    if separation:
        typer.echo(json.dumps(stage2_separation(work, device=device, architecture=arch), indent=2))
        typer.echo(f"wrote {work / 'separation.json'}")
        return
    if calibrate:
        result = calibrate_stage2(work, device=device, filter_at=filter_at, architecture=arch)
        typer.echo(json.dumps(result, indent=2))
        typer.echo(f"suggested --filter-threshold {result['suggested_tau']:.4g}; wrote {work / 'calibration.json'}")
        return
    if dest is None:
        from diffmem.errors import InputError

        raise InputError("--dest is required (where the fine-tuned pipeline goes), unless --calibrate or "
                         "--separation")
    total = steps or shipped_recipe(weights_root(arch)).stage2_steps
    with _progress() as bar:
        task = bar.add_task("stage2", total=total)
        summary = rerun_stage2(work, dest, filter_threshold, caption_aug, rta_tokens, device,
                               progress=lambda stage, i, n: bar.update(task, completed=i), steps=steps,
                               filter_at=filter_at, filter_persist=filter_persist, architecture=arch)
    typer.echo(json.dumps(summary))
    typer.echo(f"pipeline written to {dest}; measure it with `diffmem testbed quality --model {dest}`")
