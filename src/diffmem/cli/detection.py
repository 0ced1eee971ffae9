"""`diffmem detect` and `diffmem evaluate`: score prompt files (data-parallel under `accelerate launch`) and
measure how well the scores separate memorized from other prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt, DType, ForceOpt, ModelOpt
from diffmem.console import say, stderr
from diffmem.errors import InputError
from diffmem.io.durable import check_output_path, file_kind, replace_file

SETTING_KEYS = ("model", "detector", "steps", "generations", "seed", "guidance_scale", "num_inference_steps")
"""Fields of a detect row that fix its score: a resume must match them; evaluate warns if they differ."""
RECORDED = ("cosine_weight",)
"""Detector-specific settings of this command that a row records when its detector takes them."""


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
        int, typer.Option("--num-inference-steps", help="Length of the schedule the steps are taken from.")
    ] = 50,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", help="(prompt, generation) rows per denoiser call; scores do not change."),
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
        str,
        typer.Option("--detector", help="The detector (`diffmem methods` lists them with their papers and costs): "
                     "wen is Wen et al.'s mean text-conditional noise magnitude."),
    ] = "wen",
    cosine_weight: Annotated[
        float | None,
        typer.Option("--cosine-weight", help="anisotropy: weight of the alignment term (default: the authors' SD "
                     "v1.4 value, 2)."),
    ] = None,
    stable_range: Annotated[
        Path | None,
        typer.Option("--stable-range", help="step-norm: per-step band of ordinary update norms (a JSON file "
                     "`diffmem compare` writes; without it the score is the largest update norm)."),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Score each prompt by its text-conditional noise magnitude (Wen et al. 2024): higher, more memorized.

    Under `accelerate launch` with several processes the scan runs data-parallel: each process scores its slice
    of every global batch on its own device, and the main process writes the rows in input order.
    """
    from diffmem.detectors import DETECTORS, StableRange
    from diffmem.models.defaults import ModelDefaults
    from diffmem.registry import model_id
    from diffmem.runs.detection import run

    kind = DETECTORS.lookup(detector, "--detector")
    band = None if stable_range is None else StableRange.load(stable_range)
    config = kind.configure(dict(steps=steps, generations=generations, seed=seed, guidance_scale=guidance,
                                 num_inference_steps=num_inference_steps, batch_size=batch_size,
                                 cosine_weight=cosine_weight, stable_range=band))
    check_output_path(out, "--out", kind="result file", force=force,
                      inputs={"--prompts": prompts, "--stable-range": stable_range})
    if force and file_kind(out) not in (None, "result file"):
        replace_file(out, b"")  # --force: another kind of file makes way for the results
    guidance_scale = ModelDefaults.for_model(model).resolve_guidance(guidance)  # the model's own unless given
    values = (model_id(model), kind.name, config.n_steps, config.generations, config.seed, guidance_scale,
              config.num_inference_steps)
    settings: dict[str, Any] = dict(zip(SETTING_KEYS, values, strict=True))
    settings.update({key: getattr(config, key) for key in RECORDED if key in config.names()})
    if band is not None:
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
    force: ForceOpt = False,
) -> None:
    """Print AUC, TPR at 1% and 3% FPR, and a detection threshold calibrated on the negatives."""
    from diffmem.measures.detection import TPR_CONVENTION, evaluate_scores
    from diffmem.measures.plots import plot_histogram, plot_roc

    for option, image in (("--plot", plot), ("--hist", hist)):
        if image is not None:
            check_output_path(image, option, image=True, force=force,
                              inputs={"--positives": positives, "--negatives": negatives})
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
