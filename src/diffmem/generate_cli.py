"""`diffmem generate` and `diffmem mitigate`: sample images with inference-time mitigation (METHOD.md section 3).

Both write OUT/images/<index>_<generation>.png (index: the prompt's position in the prompt file) and one
OUT/results.jsonl row per prompt, and resume where they stopped when rerun on the same OUT with the same settings.
Registered on the `diffmem` app by `diffmem.cli`; torch loads only inside the commands.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.errors import InputError
from diffmem.mitigate import ALL_METHODS, DEFAULT_TARGET_LOSS
from diffmem.options import AllowPickleOpt

PromptsOpt = Annotated[
    Path, typer.Option("--prompts", help="Prompt file: .txt (one prompt a line), .jsonl, .csv or .parquet.")
]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder: images/ and results.jsonl; an existing one is resumed.")
]
ModelOpt = Annotated[
    str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed' (the bundled model).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Generation g starts from the initial noise of seed S+g.")]
GenerationsOpt = Annotated[int, typer.Option("--generations", min=1, help="Images per prompt (seeds S..S+n-1).")]
StepsOpt = Annotated[int, typer.Option("--steps", "--num-inference-steps", min=1, help="Sampling steps.")]
GuidanceOpt = Annotated[
    float | None,
    typer.Option("--guidance", help="Classifier-free guidance scale, above 1 (default: the model's own; 7.5 for "
                 "Stable Diffusion)."),
]
TargetOpt = Annotated[
    float | None,
    typer.Option("--target-loss", help="Stop optimising the embedding once its first-step score is <= this "
                 "(default: the model's own, a typical score of its non-memorized prompts; for a model without "
                 "one, Wen et al.'s SD v1.4 value: calibrate with `diffmem evaluate --json`, negatives_median)."),
]
ItersOpt = Annotated[int, typer.Option("--iters", min=0, help="At most this many optimisation steps.")]
LrOpt = Annotated[float, typer.Option("--lr", help="AdamW learning rate of the embedding optimisation.")]
ColumnOpt = Annotated[
    str | None, typer.Option("--column", help="Column holding the prompts (default: 'prompt', else 'caption').")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the best one).")]
DTypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 elsewhere)."),
]


def _guidance(model: str, guidance: float | None) -> float:
    """`--guidance`, else the model's own default (loading torch and diffusers only now)."""
    from diffmem.loading import model_guidance

    return model_guidance(model, guidance)


def _target_loss(model: str, target_loss: float | None) -> float:
    """`--target-loss`, else the model's own (its diffmem.json), else `DEFAULT_TARGET_LOSS`."""
    if target_loss is not None:
        return target_loss
    from diffmem.loading import read_model_defaults, resolve_model

    return float(read_model_defaults(resolve_model(model)).get("target_loss", DEFAULT_TARGET_LOSS))


def parse_threshold(text: str) -> float:
    """`--threshold` as a float, with a one-line error for anything that is not a number."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--threshold must be a number, not {text!r}") from None
    if math.isnan(value):
        raise InputError("--threshold must be a number, not nan")
    return value


def _peer_options(method: str, c1: float | None = None, sail_threshold: float | None = None,
                  sail_weight: float | None = None, nemo_stats: Path | None = None, nemo_threshold: float | None = None,
                  nemo_generations: int | None = None) -> dict[str, Any]:
    """The options given for a peer method (`diffmem.mitigate.peers`), as its rows record them; an option for
    another method is an error."""
    given = {"c1": c1, "sail_threshold": sail_threshold, "sail_weight": sail_weight,
             "nemo_stats": None if nemo_stats is None else str(nemo_stats.resolve()),
             "nemo_threshold": nemo_threshold, "nemo_generations": nemo_generations}
    options = {k: v for k, v in given.items() if v is not None}
    if nemo_stats is not None and not nemo_stats.is_file():
        raise InputError(f"--nemo-stats {nemo_stats}: no such file")
    from diffmem.mitigate.peers import check_options

    check_options(method, options)
    return options


GUARD_METHODS = tuple(m for m in ALL_METHODS if m != "none")
"""What `diffmem generate --guard --method` can apply to flagged prompts."""
C1Opt = Annotated[float | None, typer.Option("--c1", help="attention: scale of the beginning token's logit (1.25).")]
SailThresholdOpt = Annotated[
    float | None, typer.Option("--sail-threshold", help="sail: accept a noise once its loss is <= this (the model's "
                               "own sail_threshold, else the authors' SD v1.4 value 8.2; calibrate per model).")]
SailWeightOpt = Annotated[float | None, typer.Option("--sail-weight", help="sail: weight of ||x_T|| (0.05).")]
NemoStatsOpt = Annotated[
    Path | None, typer.Option("--nemo-stats", help="nemo: value-neuron statistics of non-memorized prompts (a file "
                              "`diffmem compare` writes); without it NeMo selects neurons by top-k alone.")]
NemoThresholdOpt = Annotated[
    float | None, typer.Option("--nemo-threshold", help="nemo: MS-SSIM threshold of the residuals (0.428, SD v1.4).")]
NemoGenerationsOpt = Annotated[int | None, typer.Option("--nemo-generations", min=2, help="nemo: seeds compared (10).")]


def generate(
    prompts: PromptsOpt,
    out: OutOpt,
    model: ModelOpt = "testbed",
    guard: Annotated[
        bool, typer.Option("--guard", help="Mitigate (with --method) prompts scoring >= --threshold.")
    ] = False,
    method: Annotated[
        str, typer.Option("--method", help=f"The guard's mitigation: one of {', '.join(GUARD_METHODS)}.")
    ] = "embedding",
    threshold: Annotated[
        str | None,
        typer.Option("--threshold", help="Detection threshold (see `diffmem evaluate`); needed by --guard. "
                     "Without --guard the rows only record which prompts it flags."),
    ] = None,
    seed: SeedOpt = 0,
    generations: GenerationsOpt = 1,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = None,
    target_loss: TargetOpt = None,
    iters: ItersOpt = 10,
    lr: LrOpt = 0.05,
    column: ColumnOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate images for every prompt; with --guard, prompts whose first-step score is >= --threshold get their
    text embedding optimised first (the others cost no extra denoiser call and give the plain images)."""
    if guard and threshold is None:
        raise InputError("--guard needs --threshold (calibrate one with `diffmem evaluate`)")
    if method not in GUARD_METHODS:
        raise InputError(f"--method must be one of {', '.join(GUARD_METHODS)}, not {method!r}")
    if method != "embedding" and not guard:
        raise InputError("--method chooses the guard's mitigation: give --guard too")
    settings: dict[str, Any] = dict(
        threshold=None if threshold is None else parse_threshold(threshold), generations=generations, seed=seed,
        num_inference_steps=steps, guidance_scale=_guidance(model, guidance),
        target_loss=_target_loss(model, target_loss), iters=iters, lr=lr)
    if method not in ("embedding", "none"):
        settings["method_options"] = _peer_options(method)
    run(prompts, out, model, method if guard else "none", settings, column, device, dtype, allow_pickle)


def mitigate(
    prompts: PromptsOpt,
    out: OutOpt,
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(ALL_METHODS)}.")],
    model: ModelOpt = "testbed",
    target_loss: TargetOpt = None,
    iters: ItersOpt = 10,
    lr: LrOpt = 0.05,
    k: Annotated[int, typer.Option("--k", min=0, help="Words inserted by rta, rna and cwr.")] = 4,
    sigma: Annotated[float, typer.Option("--sigma", help="Standard deviation of gni's embedding noise.")] = 0.1,
    c1: C1Opt = None,
    sail_threshold: SailThresholdOpt = None,
    sail_weight: SailWeightOpt = None,
    nemo_stats: NemoStatsOpt = None,
    nemo_threshold: NemoThresholdOpt = None,
    nemo_generations: NemoGenerationsOpt = None,
    seed: SeedOpt = 0,
    generations: GenerationsOpt = 1,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = None,
    column: ColumnOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate images for every prompt with one mitigation method applied to all of them (for comparisons)."""
    if method not in ALL_METHODS:
        raise InputError(f"--method must be one of {', '.join(ALL_METHODS)}, not {method!r}")
    settings: dict[str, Any] = dict(threshold=None, generations=generations, seed=seed, num_inference_steps=steps,
                                    guidance_scale=_guidance(model, guidance),
                                    target_loss=_target_loss(model, target_loss), iters=iters, lr=lr, k=k,
                                    sigma=sigma)
    options = _peer_options(method, c1, sail_threshold, sail_weight, nemo_stats, nemo_threshold, nemo_generations)
    if options or method in ("attention", "sail", "nemo"):
        settings["method_options"] = options
    run(prompts, out, model, method, settings, column, device, dtype, allow_pickle)


def run(prompts: Path, out: Path, model: str, method: str, settings: dict[str, Any], column: str | None,
        device: str | None, dtype: str | None, allow_pickle: bool = False, pipe: Any = None) -> None:
    """Read the prompts, resume OUT/results.jsonl, generate the pending prompts and write images and rows
    (`pipe`: `model` already loaded, e.g. by `diffmem reproduce`, which runs every method on one pipeline)."""
    from diffmem.cli import DType, model_id, parse_device, say, stderr
    from diffmem.prompts import read_prompts
    from diffmem.results import ResultWriter

    if method not in ALL_METHODS:
        raise InputError(f"--method must be one of {', '.join(ALL_METHODS)}, not {method!r}")
    if dtype is not None and dtype not in {d.value for d in DType}:
        raise InputError(f"--dtype must be one of {', '.join(d.value for d in DType)}, not {dtype!r}")
    prompt_file = read_prompts(prompts, column)
    if notice := prompt_file.skipped_summary():
        say(stderr, f"notice: {notice}")
    torch_device = parse_device(device)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the images and results.jsonl")
    match = {"model": model_id(model), "method": method, **settings}
    match["max_iters"] = match.pop("iters")
    index: dict[str, int] = {}
    for i, prompt in enumerate(prompt_file.prompts):
        index.setdefault(prompt, i)
    with ResultWriter(out / "results.jsonl", match=match) as writer:
        if writer.repaired:
            say(stderr, f"notice: {writer.path}: {writer.repaired}")
        todo = writer.pending(prompt_file.prompts)
        resumed = len(index) - len(todo)
        if resumed:
            say(stderr, f"notice: resuming {out}: {resumed} of {len(index)} prompts already generated")
        counts = _generate_into(writer, out, todo, index, model, torch_device, dtype, method, settings, match,
                                allow_pickle, pipe) if todo else {}
    parts = [f"{resumed} were already done", f"{counts.get('flagged', 0)} flagged",
             f"{counts.get('mitigated', 0)} mitigated", f"{counts.get('unreached', 0)} missed the target loss"]
    typer.echo(f"generated {len(todo)} prompts -> {out}; {', '.join(parts)}")


def _generate_into(writer: Any, out: Path, todo: list[str], index: dict[str, int], model: str, device: Any,
                   dtype: str | None, method: str, settings: dict[str, Any], match: dict[str, Any],
                   allow_pickle: bool = False, pipe: Any = None) -> dict[str, int]:
    """Load the model (unless `pipe` is given), generate `todo` prompt by prompt, save each prompt's PNGs, then
    append its row."""
    import torch

    from diffmem.cli import progress_bar, quiet_libraries, say, shorten, stderr
    from diffmem.loading import load_pipeline
    from diffmem.mitigate import iter_generate

    quiet_libraries()
    if pipe is None:
        with stderr.status(f"loading {model} ..."):
            pipe = load_pipeline(model, device=device, dtype=getattr(torch, dtype) if dtype else None,
                                 allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    counts = {"flagged": 0, "mitigated": 0, "unreached": 0}
    with progress_bar(len(todo), "generating") as progress:
        try:
            for images, decision in iter_generate(pipe, todo, method, **settings):
                i = index[decision.prompt]
                names = []
                for g, image in enumerate(pipe.numpy_to_pil(images)):
                    names.append(f"images/{i}_{g}.png")
                    _save_png(image, out / names[-1], len(writer))
                counts["flagged"] += bool(decision.flagged)
                counts["mitigated"] += decision.mitigated
                if decision.reached is False:
                    counts["unreached"] += 1
                    final = "nan" if decision.final_loss is None else f"{decision.final_loss:.4g}"
                    say(progress.console, f'notice: prompt "{shorten(decision.prompt)}" did not reach --target-loss '
                        f"{settings['target_loss']:g} in {decision.iters} iterations (final loss {final}); "
                        "its images use the last embedding")
                writer.write({"index": i, **decision.to_dict(), "images": names, **match})
                progress.advance(progress.task_ids[0])
        except torch.cuda.OutOfMemoryError:
            raise InputError(f"out of memory on {pipe.device}: lower --generations") from None
    return counts


def _save_png(image: Any, path: Path, done: int) -> None:
    """Save a PNG whole (a temporary file renamed over `path`, so a kill never leaves half an image under its
    name); a write error (disk full, file size limit) is one line saying the finished prompts are kept."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}; the {done} prompts finished are kept, "
                         "rerun to resume") from None
