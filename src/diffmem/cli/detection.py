"""`diffmem detect` and `diffmem evaluate`: score prompt files (data-parallel under `accelerate launch`) and
measure how well the scores separate memorized from other prompts."""

from __future__ import annotations

import inspect
import json
import math
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import USAGE_ERROR, AllowPickleOpt, DType, ModelOpt
from diffmem.console import progress_bar, say, shorten, stderr
from diffmem.errors import DiffmemError, InputError
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
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from diffmem.detectors.base import parse_steps
    from diffmem.io.prompts import read_prompts
    from diffmem.io.results import ResultWriter
    from diffmem.models.loading import model_guidance, parse_device
    from diffmem.registry import model_id

    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes > 1 and device is not None:
        raise InputError("--device is chosen by `accelerate launch` when it starts several processes; leave it out")
    stepped = (DetectorName.wen, DetectorName.bright_ending)
    if steps is not None and detector not in stepped:
        raise InputError(f"--steps applies to the wen and bright-ending detectors; {detector.value} has its own")
    default_steps = "all" if detector is DetectorName.bright_ending else "first"
    n_steps = parse_steps(default_steps if steps is None else steps, num_inference_steps)
    if not math.isfinite(cosine_weight):
        raise InputError(f"--cosine-weight must be a finite number, not {cosine_weight}")
    check_output_path(out, "--out")
    torch_device = state.device if state.num_processes > 1 else parse_device(device)
    values = (model_id(model), detector.value, n_steps, generations, seed, model_guidance(model, guidance),
              num_inference_steps)
    settings: dict[str, Any] = dict(zip(SETTING_KEYS, values, strict=True))
    if detector is DetectorName.anisotropy:
        settings["cosine_weight"] = cosine_weight
    if stable_range is not None:
        if detector is not DetectorName.step_norm:
            raise InputError("--stable-range applies to the step-norm detector")
        from diffmem.detectors.step_norm import StableRange

        band = StableRange.load(stable_range)
        settings["stable_range"] = {"lo": list(band.lo), "hi": list(band.hi)}
    with ExitStack() as stack:

        def open_run() -> tuple[tuple[Any, Any], list[str]]:
            """Read the prompts and open (or resume) the result file: the main process's part. Returns what
            stays on it (the prompt file and the writer) and the prompts left to score, which all processes get."""
            prompt_file = read_prompts(prompts, column)
            if notice := prompt_file.skipped_summary():
                say(stderr, f"notice: {notice}")
            writer = stack.enter_context(ResultWriter(out, match=settings))
            if writer.repaired:
                say(stderr, f"notice: {out}: {writer.repaired}")
            todo = writer.pending(prompt_file.prompts)
            resumed = len(set(prompt_file.prompts)) - len(todo)
            if resumed:
                say(stderr, f"notice: resuming {out}: {resumed} of {resumed + len(todo)} prompts already scored")
            return (prompt_file, writer), todo

        (prompt_file, writer), todo = _on_main(state, open_run)
        counts = _score_into(writer, todo, model, torch_device, dtype, settings, batch_size, state,
                             allow_pickle) if todo else {}
    if state.is_main_process:
        n_distinct = len(set(prompt_file.prompts))
        _summary(out, len(todo), n_distinct - len(todo), len(prompt_file.skipped), len(prompt_file) - n_distinct,
                 counts)


def _on_main(state: Any, fn: Any) -> tuple[Any, Any]:
    """Run `fn() -> (local, shared)` on the main process only; the other processes get `((None, None), shared)`.
    A user error there ends every process: the main one says why, the others exit quietly with the same code."""
    if state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    local: Any = (None, None)
    payload: list[Any] = [None, None]  # [shared, error message]
    if state.is_main_process:
        try:
            local, payload[0] = fn()
        except DiffmemError as exc:
            payload[1] = str(exc)
    broadcast_object_list(payload)
    if payload[1] is not None:
        if state.is_main_process:
            raise InputError(payload[1])
        raise typer.Exit(USAGE_ERROR)
    return local, payload[0]


def _score_into(
    writer: Any,
    todo: list[str],
    model: str,
    device: Any,
    dtype: DType | None,
    settings: dict[str, Any],
    batch_size: int,
    state: Any,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Load the model, score `todo` batch by batch (data-parallel over `state`'s processes) and, on the main
    process (`writer` is None elsewhere), append each global batch's rows; returns warning and process counts."""
    from contextlib import nullcontext

    import torch

    from diffmem.detectors.base import iter_data_parallel
    from diffmem.models.loading import load_pipeline, quiet_diffusers

    quiet_diffusers()
    main = writer is not None
    with stderr.status(f"loading {model} ...") if main else nullcontext(), state.main_process_first():
        pipe: Any = load_pipeline(model, device=device, dtype=getattr(torch, dtype.value) if dtype else None,
                                  allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)  # load_pipeline does it too; the CLI must never show tqdm
    detector = _detector(pipe, settings, batch_size)
    counts: dict[str, Any] = {"truncated": 0, "errors": 0, "per_process": [0] * state.num_processes}
    limit = pipe.tokenizer.model_max_length - 2
    bar: Any = progress_bar(len(todo), "scoring prompts") if main else nullcontext()
    with bar as progress:
        try:
            for scores, per_process in iter_data_parallel(detector, todo, state):
                counts["per_process"] = [a + b for a, b in zip(counts["per_process"], per_process, strict=True)]
                if not main:
                    continue
                for s in scores:
                    name = f'prompt "{shorten(s.prompt)}"'
                    if s.truncated:
                        counts["truncated"] += 1
                        cut = s.truncated_text.strip()
                        say(
                            progress.console,
                            f"warning: {name} has {s.n_tokens} tokens, over the text encoder's "
                            f'{limit}; scored without the cut-off words "{cut}"',
                        )
                    if s.error:
                        counts["errors"] += 1
                        say(progress.console, f"warning: {name}: {s.error}; its score is null")
                writer.write_many({**s.to_dict(), **settings} for s in scores)
                progress.advance(progress.task_ids[0], len(scores))
        except torch.cuda.OutOfMemoryError:
            raise InputError(f"out of memory on {pipe.device}: lower --batch-size ({batch_size})") from None
    return counts


def _detector(pipe: Any, settings: dict[str, Any], batch_size: int) -> Any:
    """The detector a `diffmem detect` run's settings name."""
    from diffmem.detectors import DETECTORS, StableRange

    common = {"generations": settings["generations"], "seed": settings["seed"],
              "num_inference_steps": settings["num_inference_steps"], "batch_size": batch_size}
    detector = DETECTORS[settings["detector"]]
    accepted = inspect.signature(detector).parameters
    common.update({key: settings[key] for key in ("steps", "guidance_scale", "cosine_weight")
                   if key in accepted and key in settings})
    if "stable_range" in settings:
        common["stable_range"] = StableRange(**{k: tuple(v) for k, v in settings["stable_range"].items()})
    return detector(pipe, **common)


def _summary(
    out: Path, scored: int, resumed: int, skipped: int, duplicates: int, counts: dict[str, Any]
) -> None:
    """Print the run's one-line summary on stdout."""
    parts = [f"{resumed} were already in the file", f"{skipped} empty rows skipped"]
    if duplicates:
        parts.append(f"{duplicates} repeated prompts written once")
    parts += [f"{counts.get('truncated', 0)} truncated", f"{counts.get('errors', 0)} errors (null score)"]
    per_process = counts.get("per_process", [])
    where = f" on {len(per_process)} processes ({' + '.join(map(str, per_process))})" if len(per_process) > 1 else ""
    typer.echo(f"scored {scored} prompts{where} -> {out}; {', '.join(parts)}")


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
