"""`diffmem detect` and `diffmem evaluate`: score prompt files (data-parallel under `accelerate launch`) and
measure how well the scores separate memorized from other prompts."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt, DType, ModelOpt
from diffmem.console import say, stderr
from diffmem.errors import InputError
from diffmem.io.durable import check_output_path

SETTING_KEYS = ("model", "detector", "steps", "generations", "seed", "guidance_scale", "num_inference_steps")
"""Fields of a detect row that fix its score: a resume must match them; evaluate warns if they differ."""


class DetectorName(str, Enum):
    """Detectors `diffmem detect` can run (METHOD.md sections 1 and 6)."""

    wen = "wen"
    anisotropy = "anisotropy"
    sharpness = "sharpness"
    ren_le = "ren-le"
    ren_ae = "ren-ae"
    bright_ending = "bright-ending"
    nemo = "nemo"
    step_norm = "step-norm"
    carlini = "carlini"


def detect(
    prompts: Annotated[
        Path,
        typer.Option("--prompts", help="Prompt file: .txt (one prompt a line), .jsonl, .csv or .parquet."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Result file (JSON Lines, one row per prompt); an existing one is resumed."
        ),
    ],
    model: ModelOpt = "testbed",
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps", help="Sampling steps to score: 'first', 'all' or a number k of leading steps (wen: default "
            "first; bright-ending: default all; the other detectors have their own)."
        ),
    ] = None,
    generations: Annotated[
        int, typer.Option("--generations", min=1, help="Initial noises (seeds S..S+n-1) averaged per prompt.")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed S of the first generation's initial noise.")] = 0,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance", help="CFG scale; steers the sampler between scored steps after the first (default: the "
            "model's own; 7.5 for Stable Diffusion).",
        ),
    ] = None,
    num_inference_steps: Annotated[
        int,
        typer.Option("--num-inference-steps", min=1, help="Length of the schedule the steps are taken from."),
    ] = 50,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, help="(prompt, generation) rows per denoiser call; scores do not change."
        ),
    ] = 32,
    column: Annotated[
        str | None,
        typer.Option("--column", help="Column holding the prompts (default: 'prompt', else 'caption')."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the best one).")
    ] = None,
    dtype: Annotated[
        DType | None,
        typer.Option("--dtype", help="Weight dtype (default: float16 on CUDA, float32 elsewhere)."),
    ] = None,
    detector: Annotated[
        DetectorName,
        typer.Option(
            "--detector",
            help="wen: mean text-conditional noise magnitude (Wen et al. 2024); anisotropy: first-step magnitude "
            "plus a weighted low-noise alignment term (Asthana & Belagiannis 2026); sharpness: ||H_delta s_delta||^2 "
            "(Jeon et al. 2025); ren-le / ren-ae: cross-attention entropy, one layer at the first step / the last "
            "steps plus the summary tokens (Ren et al. 2024); bright-ending: d_t masked by the end token's final "
            "attention (Chen et al. 2025); nemo: SSIM of noise residuals across seeds (Hintersdorf et al. 2024); "
            "step-norm: latent update norms against their stable range (Huang et al. 2026); carlini: tightest "
            "cluster of generated images (Carlini et al. 2023).",
        ),
    ] = DetectorName.wen,
    cosine_weight: Annotated[
        float,
        typer.Option("--cosine-weight", help="anisotropy: weight of the alignment term (the authors' SD v1.4 value)."),
    ] = 2.0,
    stable_range: Annotated[
        Path | None,
        typer.Option("--stable-range", help="step-norm: per-step band of ordinary update norms (a JSON file "
                     "`diffmem compare` writes; without it the score is the largest update norm)."),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Score each prompt by its text-conditional noise magnitude (Wen et al. 2024): higher, more memorized.

    Under `accelerate launch` with several processes the scan runs data-parallel: each process scores its slice
    of every global batch on its own device, and the main process writes the rows in input order.
    """
    from diffmem.detectors.base import parse_steps
    from diffmem.models.defaults import ModelDefaults
    from diffmem.registry import model_id
    from diffmem.runs.detection import run

    stepped = (DetectorName.wen, DetectorName.bright_ending)
    if steps is not None and detector not in stepped:
        raise InputError(f"--steps applies to the wen and bright-ending detectors; {detector.value} has its own")
    default_steps = "all" if detector is DetectorName.bright_ending else "first"
    n_steps = parse_steps(default_steps if steps is None else steps, num_inference_steps)
    if not math.isfinite(cosine_weight):
        raise InputError(f"--cosine-weight must be a finite number, not {cosine_weight}")
    check_output_path(out, "--out")
    guidance_scale = ModelDefaults.for_model(model).resolve_guidance(guidance)  # the model's own unless given
    values = (model_id(model), detector.value, n_steps, generations, seed, guidance_scale, num_inference_steps)
    settings: dict[str, Any] = dict(zip(SETTING_KEYS, values, strict=True))
    if detector is DetectorName.anisotropy:
        settings["cosine_weight"] = cosine_weight
    if stable_range is not None:
        if detector is not DetectorName.step_norm:
            raise InputError("--stable-range applies to the step-norm detector")
        from diffmem.detectors.step_norm import StableRange

        band = StableRange.load(stable_range)
        settings["stable_range"] = {"lo": list(band.lo), "hi": list(band.hi)}
    run(prompts, out, model, settings, column, device, dtype.value if dtype else None, batch_size, allow_pickle,
        echo=typer.echo)


def _scores(path: Path) -> tuple[list[float | None], dict[str, Any]]:
    """The `score` column of a result file and the settings of its first row (to compare two files)."""
    from diffmem.io.results import read_results

    rows = read_results(path)
    missing = [i for i, row in enumerate(rows, 1) if "score" not in row]
    if missing:
        raise InputError(f"{path}: row {missing[0]} has no 'score' field; is it a `diffmem detect` output?")
    return [row["score"] for row in rows], {k: rows[0].get(k) for k in SETTING_KEYS}


def evaluate(
    positives: Annotated[
        Path, typer.Option("--positives", help="Results of memorized prompts (detect output).")
    ],
    negatives: Annotated[
        Path, typer.Option("--negatives", help="Results of non-memorized reference prompts.")
    ],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the ROC curve to this image, e.g. roc.png.")
    ] = None,
    hist: Annotated[
        Path | None, typer.Option("--hist", help="Write the score histograms to this image.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    target_fpr: Annotated[
        float, typer.Option("--target-fpr", help="FPR the threshold is calibrated for, on the negatives.")
    ] = 0.01,
) -> None:
    """Print AUC, TPR at 1% and 3% FPR, and a detection threshold calibrated on the negatives."""
    from diffmem.measures.detection import TPR_CONVENTION, evaluate_scores
    from diffmem.measures.plots import plot_histogram, plot_roc

    for option, image in (("--plot", plot), ("--hist", hist)):
        if image is not None:
            check_output_path(image, option, image=True)
    pos, pos_settings = _scores(positives)
    neg, neg_settings = _scores(negatives)
    differ = [k for k in pos_settings if pos_settings[k] != neg_settings[k]]
    if differ:
        say(
            stderr,
            "warning: the two files were scored with different settings ("
            + ", ".join(f"{k}: {pos_settings[k]!r} vs {neg_settings[k]!r}" for k in differ)
            + "); their scores may not be comparable",
        )
    ev = evaluate_scores(pos, neg, target_fpr)
    notes = ev.notes()
    written = {}
    if plot:
        written["plot"] = str(plot_roc(pos, neg, plot))
    if hist:
        written["hist"] = str(plot_histogram(pos, neg, hist, threshold=ev.threshold))
    if as_json:
        typer.echo(json.dumps({**ev.to_dict(), "notes": notes, **written}))
        return
    lines = [
        f"AUC          {ev.auc:.4f}",
        f"TPR@1%FPR    {ev.tpr_at_1fpr:.4f}",
        f"TPR@3%FPR    {ev.tpr_at_3fpr:.4f}",
        f"  (TPR@x%FPR = {TPR_CONVENTION})",
        f"threshold    {ev.threshold:.6g}  (flag score >= threshold; calibrated on the negatives "
        f"for {ev.target_fpr:.2%} FPR)",
        f"prompts      {ev.n_pos} memorized, {ev.n_neg} non-memorized",
    ]
    lines += [f"note: {note}" for note in notes]
    lines += [f"wrote {path}" for path in written.values()]
    typer.echo("\n".join(lines))
