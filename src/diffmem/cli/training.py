"""`diffmem train`: fine-tune a pipeline's denoiser (a UNet, or SD3's transformer) on images and captions,
optionally with the magnitude filter."""

from __future__ import annotations

from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt, deprecated_option, renamed
from diffmem.console import progress_bar, say, stderr
from diffmem.errors import InputError


class FilterAt(str, Enum):
    """Where the magnitude filter measures d."""

    first_step = "first-step"
    train = "train"


class CaptionAug(str, Enum):
    """Training-caption augmentations of `diffmem train`."""

    rta = "rta"


def train(
    model: Annotated[str, typer.Option("--model", help="Diffusers pipeline folder, hub id, or 'testbed-base'.")],
    data: Annotated[
        Path, typer.Option("--data", help="Images with NAME.txt captions, or an imagefolder with metadata.jsonl.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Run folder: latent cache, checkpoint/, log.jsonl, pipeline/ at the end.")
    ],
    filter_threshold: Annotated[
        float | None,
        typer.Option("--filter-threshold", help="TAU: leave samples with d >= TAU out of the loss (see --calibrate)."),
    ] = None,
    filter_at: Annotated[
        FilterAt, typer.Option("--filter-at", help="Where d is measured: 'first-step' (the first sampling step, "
                               "the detector's score; separates memorized samples) or 'train' (each sample's "
                               "training timestep, Wen et al.'s rule).")
    ] = FilterAt.first_step,
    filter_persist: Annotated[
        bool, typer.Option("--filter-persist", help="A caption the filter flags stays out of the loss for the rest "
                           "of the run (keyed on the caption text, so not with --caption-aug).")
    ] = False,
    caption_aug: Annotated[
        CaptionAug | None, typer.Option("--caption-aug", help="Augment training captions: rta (random tokens).")
    ] = None,
    rta_tokens: Annotated[int, typer.Option("--rta-tokens", min=1, help="Tokens added per caption by rta.")] = 4,
    train_steps: Annotated[
        int | None, typer.Option("--train-steps", min=1, help="Optimizer steps (global batches; default 1000).")
    ] = None,
    steps: Annotated[int | None, deprecated_option("--steps", "--train-steps")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Global batch, split over processes by accelerate.")
    ] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data order, noise, timesteps and rta.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")
    ] = 500,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between log.jsonl records.")] = 10,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Do not train: measure d of the base model, suggest a TAU.")
    ] = False,
    measurements: Annotated[
        int, typer.Option("--measurements", min=1, help="(image, timestep) pairs --calibrate measures.")
    ] = 2000,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Fine-tune the UNet (or SD3's transformer) of a pipeline on images and captions, optionally filtering
    memorizing samples."""
    from diffmem.models.loading import quiet_diffusers
    from diffmem.training.finetune import FinetuneSettings, calibration_lines, finetune, interrupted_message
    from diffmem.training.finetune import calibrate as run_calibration

    steps = renamed(train_steps, steps, "--steps", "--train-steps", 1000)
    settings = FinetuneSettings(model=model, data=str(data), steps=steps, batch_size=batch_size, lr=lr,
                                filter_threshold=filter_threshold, filter_at=filter_at.value,
                                filter_persist=filter_persist,
                                rta_tokens=rta_tokens, seed=seed,
                                caption_aug=caption_aug.value if caption_aug else None)
    settings.check()
    quiet_diffusers()
    if calibrate:
        with progress_bar(measurements, "calibrating") as meter:
            summary = run_calibration(settings, out, measurements, notice=lambda m: say(meter.console, m),
                                      allow_pickle=allow_pickle,
                                      progress=lambda i, n: meter.update(meter.task_ids[0], completed=i))
        typer.echo("\n".join(calibration_lines(summary, out)))
        return
    with ExitStack() as stack:
        try:
            result = finetune(settings, out, resume=resume, checkpoint_every=checkpoint_every, log_every=log_every,
                              notice=lambda m: say(stderr, m), progress=_training_bar(stack, steps),
                              allow_pickle=allow_pickle)
        except KeyboardInterrupt:
            raise InputError(interrupted_message(out)) from None
    if result.main_process:  # under `accelerate launch` the other processes stay quiet
        stats = result.stats
        excluded = "" if filter_threshold is None else (
            f"; TAU {filter_threshold:g} excluded {stats['excluded_share']:.1%} of samples and skipped "
            f"{stats['skipped_steps']} updates")
        typer.echo(f"trained steps {stats['resumed_from']}..{stats['steps']} -> {result.pipeline_dir}{excluded}")


def _training_bar(stack: ExitStack, total: int) -> Any:
    """A `train` progress callback: opens a bar in `stack` at the first step it hears of, then advances it and
    shows the last logged loss and excluded share."""
    bars: list[Any] = []

    def show(step: int, record: dict) -> None:
        if not bars:
            bars.append(stack.enter_context(progress_bar(total, "training")))
            bars[0].reset(bars[0].task_ids[0], completed=step - 1)  # a resumed run starts part-way
        bar = bars[0]
        if record:
            text = f"training (loss {record['loss']:.4g}"
            text += ")" if record.get("excluded") is None else f", excluded {record['excluded']:.1%})"
            bar.update(bar.task_ids[0], description=text)
        bar.update(bar.task_ids[0], completed=step)

    return show
