"""The `diffmem` command line: a thin shell over the library (detect, evaluate, and the testbed sub-app).

User errors (bad files, bad option values, unloadable models, Ctrl-C) end with one `error: ...` line on stderr
and exit code 2, never a traceback. torch and diffusers are imported inside the commands, so `--help` and
argument errors do not wait for them.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

# Read by transformers/diffusers/huggingface_hub when first imported: keep their chatter out of CLI output.
for _name, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
):
    os.environ.setdefault(_name, _value)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from diffmem.durable import check_output_path  # noqa: E402

try:  # typer vendors its own click (typer._click): its usage errors are not click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer: click itself
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]
from diffmem.errors import DiffmemError, InputError  # noqa: E402
from diffmem.options import AllowPickleOpt, TokenOpt  # noqa: E402

USAGE_ERROR = 2
"""Exit code for every user error (the code typer already uses for usage errors)."""

SETTING_KEYS = ("model", "detector", "steps", "generations", "seed", "guidance_scale", "num_inference_steps")
"""Fields of a detect row that fix its score: a resume must match them; evaluate warns if they differ."""

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(USAGE_ERROR)


class _ErrorHandlingGroup(TyperGroup):
    """Runs every command, sub-app commands included, turning user errors into `fail(...)`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DiffmemError as exc:
            fail(str(exc))
        except UsageError as exc:  # a bad option or command: one line too, not click's framed box
            if isinstance(exc, NoArgsIsHelpError):
                raise
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            fail(f"{exc.format_message()} (see '{where} --help')")
        except KeyboardInterrupt:
            fail("interrupted (rerun the same command to resume a detect run)")
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}")


app = typer.Typer(
    name="diffmem",
    cls=_ErrorHandlingGroup,
    help="Detect training-data memorization in Stable-Diffusion-family text-to-image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


class DType(str, Enum):
    """Weight dtypes a model can be loaded in."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def quiet_libraries() -> None:
    """Silence diffusers/transformers logging and loading progress bars (the CLI draws its own)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from diffmem.loading import quiet_diffusers

    quiet_diffusers()
    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()


def model_id(model: str) -> str:
    """How a model is recorded in result rows: the absolute path of a local folder, else the name as given."""
    from diffmem.loading import TESTBED_NAMES

    path = Path(model).expanduser()
    if model not in TESTBED_NAMES and path.exists():
        return str(path.resolve())
    return model


def parse_device(device: str | None) -> Any:
    """`--device` as a torch.device (None: the library's default), checked to exist on this machine."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: Apple MPS is not available on this machine")
    return dev


def shorten(text: str, width: int = 60) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis, for messages about a prompt."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr; yields the Progress (its `.console` prints above the bar)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        progress.add_task(description, total=total)
        yield progress


def say(console: Console, message: str) -> None:
    """Print one plain line (no markup, no wrapping) to `console`."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


@app.command()
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
    model: Annotated[
        str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed' (the bundled model).")
    ] = "testbed",
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

    from diffmem.detect import parse_steps
    from diffmem.loading import model_guidance
    from diffmem.prompts import read_prompts
    from diffmem.results import ResultWriter

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

    from diffmem.detect import iter_data_parallel
    from diffmem.loading import load_pipeline

    quiet_libraries()
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
    from diffmem.results import read_results

    rows = read_results(path)
    missing = [i for i, row in enumerate(rows, 1) if "score" not in row]
    if missing:
        raise InputError(f"{path}: row {missing[0]} has no 'score' field; is it a `diffmem detect` output?")
    return [row["score"] for row in rows], {k: rows[0].get(k) for k in SETTING_KEYS}


@app.command()
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
    from diffmem.evaluate import TPR_CONVENTION, evaluate_scores, plot_histogram, plot_roc

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

@app.command()
def explain(
    prompt: Annotated[str, typer.Argument(help="The prompt to explain.")],
    model: Annotated[
        str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed' (the bundled model).")
    ] = "testbed",
    method: Annotated[
        str, typer.Option("--method", help="'gradient' (one forward + backward) or 'leave-one-out'.")
    ] = "gradient",
    steps: Annotated[str, typer.Option("--steps", help="'first', 'all' or a number k of leading steps.")] = "first",
    generations: Annotated[int, typer.Option("--generations", min=1, help="Initial noises averaged.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first generation's initial noise.")] = 0,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart PNG of word significance.")] = None,
    suggest: Annotated[bool, typer.Option("--suggest", help="Propose edits scoring below --threshold.")] = False,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Detection threshold for --suggest (see `evaluate`).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a chart.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    neurons: Annotated[
        bool, typer.Option("--neurons", help="Instead: the cross-attention value neurons that carry the prompt's "
                           "memorization (NeMo, Hintersdorf et al. 2024).")
    ] = False,
    nemo_stats: Annotated[
        Path | None, typer.Option("--nemo-stats", help="--neurons: value-neuron statistics of non-memorized prompts "
                                  "(a file `diffmem compare` writes; without it, top-k selection alone).")
    ] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Which words of PROMPT drive its memorization score: per-token and per-word significance (or, with
    --neurons, which value neurons)."""
    from diffmem.explain import METHODS, suggest_edits
    from diffmem.explain import explain as explain_prompt
    from diffmem.loading import load_pipeline
    from diffmem.render import png_chart, terminal_chart

    if neurons:
        _explain_neurons(prompt, model, seed, nemo_stats, as_json, device, allow_pickle)
        return
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if suggest and threshold is None:
        raise InputError("--suggest needs --threshold (calibrate one with `diffmem evaluate`)")
    if not prompt.strip():
        raise InputError("the prompt is empty: there is nothing to explain")
    if plot is not None:
        check_output_path(plot, "--plot", image=True)
    quiet_libraries()
    with stderr.status(f"loading {model} ..."):
        pipe: Any = load_pipeline(model, device=parse_device(device), allow_pickle=allow_pickle)
    attr = explain_prompt(pipe, prompt, method=method, steps=steps, generations=generations, seed=seed)
    if attr.cut_off:
        say(stderr, f'warning: the text encoder cut off "{attr.cut_off}"; those words have no significance')
    if len(attr.words) and all(w.significance <= 0 for w in attr.words):
        say(stderr, "notice: no word raises the score (e.g. a prompt of only stop words)")
    suggestions = suggest_edits(pipe, attr, threshold) if suggest and threshold is not None else []
    if plot:
        png_chart(attr, plot)
    if as_json:
        out = attr.to_dict()
        if suggest:
            out["suggestions"] = [vars(s) for s in suggestions]
        typer.echo(json.dumps(out))
        return
    Console().print(terminal_chart(attr))
    if suggest:
        if not suggestions:
            typer.echo(f"no edit tried scores below {threshold}")
        for s in suggestions:
            typer.echo(f"{s.score:.4f}  {s.prompt}   ({s.change})")
    if plot:
        typer.echo(f"wrote {plot}")


def _explain_neurons(prompt: str, model: str, seed: int, stats: Path | None, as_json: bool, device: str | None,
                     allow_pickle: bool) -> None:
    """`diffmem explain --neurons`: NeMo's localisation of PROMPT, one line per value layer with neurons."""
    from diffmem.loading import load_pipeline
    from diffmem.mitigate.nemo import NeuronStatistics, localize, value_layer_names

    if not prompt.strip():
        raise InputError("the prompt is empty: there is nothing to explain")
    statistics = None if stats is None else NeuronStatistics.load(stats)
    quiet_libraries()
    with stderr.status(f"loading {model} ..."):
        pipe: Any = load_pipeline(model, device=parse_device(device), allow_pickle=allow_pickle)
    found = localize(pipe, prompt, statistics, seed=seed)
    names = value_layer_names(pipe.unet)
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, **found.to_dict(), "layers": names}))
        return
    if not found.memorized:
        typer.echo("not memorized by NeMo's test: no two seeds' noise residuals are alike")
        return
    typer.echo(f"{found.count} neurons; residual MS-SSIM with them off: {found.refined_ssim:.3f}")
    for name, layer in zip(names, found.neurons, strict=True):
        if layer:
            typer.echo(f"{name}.to_v  {', '.join(map(str, layer))}")


@app.command()
def serve(
    model: Annotated[
        str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed'; fixed for the server's life.")
    ] = "testbed",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Detection threshold (flag score >= threshold).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="JSON with a 'threshold' field, e.g. `evaluate --json`.")
    ] = None,
    steps: Annotated[str, typer.Option("--steps", help="'first', 'all' or k leading steps per score.")] = "first",
    generations: Annotated[int, typer.Option("--generations", min=1, help="Initial noises per score.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first generation's initial noise.")] = 0,
    generate_steps: Annotated[
        int, typer.Option("--generate-steps", min=1, help="DDIM steps of the page's Generate button.")
    ] = 25,
    mitigate_iters: Annotated[int, typer.Option("--mitigate-iters", min=0, help="Mitigation iterations.")] = 10,
    target_loss: Annotated[
        float | None, typer.Option("--target-loss", help="Mitigation's first-step target (default: the threshold).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Guidance scale of generated images (default: the model's own).")
    ] = None,
    max_prompt_chars: Annotated[int, typer.Option("--max-prompt-chars", min=1, help="Longest prompt.")] = 1000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most prompts per detect request.")] = 64,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait for the model.")] = 16,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    token: TokenOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Web page and JSON HTTP API: screen, explain and fix prompts (page at /, API at /api, schema /openapi.json)."""
    from diffmem.app.server import serve as run_server
    from diffmem.app.service import Limits, Settings

    settings = Settings(steps=steps, generations=generations, seed=seed, generate_steps=generate_steps,
                        mitigate_iters=mitigate_iters, target_loss=target_loss, guidance_scale=guidance)
    limits = Limits(max_prompt_chars=max_prompt_chars, max_batch=max_batch, max_queue=max_queue)
    quiet_libraries()
    run_server(model, host=host, port=port, device=parse_device(device), threshold=threshold,
               calibration=calibration, settings=settings, limits=limits, echo=typer.echo, token=token,
               allow_pickle=allow_pickle)


class CaptionAug(str, Enum):
    """Training-caption augmentations of `diffmem train`."""

    rta = "rta"


@app.command("train")
def train_command(
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
    caption_aug: Annotated[
        CaptionAug | None, typer.Option("--caption-aug", help="Augment training captions: rta (random tokens).")
    ] = None,
    rta_tokens: Annotated[int, typer.Option("--rta-tokens", min=1, help="Tokens added per caption by rta.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps (global batches).")] = 1000,
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
    """Fine-tune the UNet of a pipeline on images and captions, optionally filtering memorizing samples."""
    from diffmem.finetune import FinetuneSettings, calibration_lines, finetune, interrupted_message
    from diffmem.finetune import calibrate as run_calibration

    settings = FinetuneSettings(model=model, data=str(data), steps=steps, batch_size=batch_size, lr=lr,
                                filter_threshold=filter_threshold, rta_tokens=rta_tokens, seed=seed,
                                caption_aug=caption_aug.value if caption_aug else None)
    settings.check()
    quiet_libraries()
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


def main() -> None:
    """The `diffmem` console script: run the app; a user error escaping it still ends as one line, exit 2."""
    try:
        app(prog_name="diffmem")
    except DiffmemError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(USAGE_ERROR)


# ---------------------------------------------------------------------------------------------------------
# Mount point of the `diffmem testbed ...` sub-app (src/diffmem/testbed/cli.py). It is optional: without it
# the other commands work unchanged.
try:
    from diffmem.testbed.cli import app as testbed_app
except ModuleNotFoundError as exc:  # only a missing testbed/cli.py is tolerated, not a broken import in it
    if exc.name != "diffmem.testbed.cli":
        raise
else:
    app.add_typer(testbed_app, name="testbed")

# `diffmem generate` and `diffmem mitigate`: sampling with inference-time mitigation (src/diffmem/generate_cli.py).
from diffmem.generate_cli import generate as _generate_command  # noqa: E402
from diffmem.generate_cli import mitigate as _mitigate_command  # noqa: E402

app.command("generate")(_generate_command)
app.command("mitigate")(_mitigate_command)

# `diffmem fetch-references` and `diffmem reproduce`: the paper's tables (src/diffmem/paper_cli.py).
from diffmem.paper_cli import fetch_references as _fetch_references_command  # noqa: E402
from diffmem.paper_cli import reproduce as _reproduce_command  # noqa: E402

app.command("fetch-references")(_fetch_references_command)
app.command("reproduce")(_reproduce_command)

# `diffmem compare`: every detector and mitigation on one model, one table each (src/diffmem/compare_cli.py).
from diffmem.compare_cli import compare as _compare_command  # noqa: E402

app.command("compare")(_compare_command)


if __name__ == "__main__":
    main()
