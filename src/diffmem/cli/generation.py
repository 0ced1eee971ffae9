"""`diffmem generate` and `diffmem mitigate`: sample images with inference-time mitigation (METHOD.md section 3).

Both write OUT/images/<index>_<generation>.png and one OUT/results.jsonl row per prompt, and resume when rerun
(`diffmem.runs.generation`); torch loads only inside the commands.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt, ModelOpt
from diffmem.errors import InputError
from diffmem.mitigate import ALL_METHODS
from diffmem.runs.generation import run as run_generation

PromptsOpt = Annotated[
    Path, typer.Option("--prompts", help="Prompt file: .txt (one prompt a line), .jsonl, .csv or .parquet.")
]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder: images/ and results.jsonl; an existing one is resumed.")
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


def _model_settings(model: str, guidance: float | None, target_loss: float | None) -> dict[str, float]:
    """`--guidance` and `--target-loss`, each the model's own unless given: what the rows record, read from the
    model's folder before it loads (`ModelDefaults`)."""
    from diffmem.models.defaults import ModelDefaults

    defaults = ModelDefaults.for_model(model)
    return {"guidance_scale": defaults.resolve_guidance(guidance),
            "target_loss": defaults.resolve_target_loss(target_loss)}


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
        num_inference_steps=steps, **_model_settings(model, guidance, target_loss), iters=iters, lr=lr)
    if method not in ("embedding", "none"):
        settings["method_options"] = _peer_options(method)
    run_generation(prompts, out, model, method if guard else "none", settings, column, device, dtype, allow_pickle,
                   echo=typer.echo)


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
                                    **_model_settings(model, guidance, target_loss), iters=iters, lr=lr, k=k,
                                    sigma=sigma)
    options = _peer_options(method, c1, sail_threshold, sail_weight, nemo_stats, nemo_threshold, nemo_generations)
    if options or method in ("attention", "sail", "nemo"):
        settings["method_options"] = options
    run_generation(prompts, out, model, method, settings, column, device, dtype, allow_pickle, echo=typer.echo)
