"""`diffmem generate` and `diffmem mitigate`: sample images with inference-time mitigation (METHOD.md section 3).

Both write OUT/images/<index>_<generation>.png and one OUT/results.jsonl row per prompt, and resume when rerun
(`diffmem.runs.generation`); torch loads only inside the commands.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt, ItersOpt, ModelOpt, deprecated_option, renamed
from diffmem.errors import InputError
from diffmem.registry import DEFAULT_MITIGATION, DEFAULT_WITHOUT_CFG_BATCH
from diffmem.runs.generation import run as run_generation

PromptsOpt = Annotated[
    Path, typer.Option("--prompts", help="Prompt file: .txt (one prompt a line), .jsonl, .csv or .parquet.")
]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder: images/ and results.jsonl; an existing one is resumed.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Generation g starts from the initial noise of seed S+g.")]
GenerationsOpt = Annotated[int, typer.Option("--generations", min=1, help="Images per prompt (seeds S..S+n-1).")]
StepsOpt = Annotated[int | None, typer.Option("--num-inference-steps", help="Sampling steps (default 50).")]
OldStepsOpt = Annotated[int | None, deprecated_option("--steps", "--num-inference-steps")]
GuidanceOpt = Annotated[
    float | None,
    typer.Option("--guidance", help="Classifier-free guidance scale, above 1 (default: the model's own; 7.5 for "
                 "Stable Diffusion)."),
]
TargetOpt = Annotated[
    float | None,
    typer.Option("--target-loss", help="embedding, initial-noise --variant sample: stop optimising once the "
                 "first-step score is <= this "
                 "(default: the model's own, a typical score of its non-memorized prompts; for a model without "
                 "one, Wen et al.'s SD v1.4 value: calibrate with `diffmem evaluate --json`, negatives_median)."),
]
LrOpt = Annotated[float | None, typer.Option("--lr", help="embedding, sail: learning rate of the optimisation "
                                             "(0.05).")]
ColumnOpt = Annotated[
    str | None, typer.Option("--column", help="Column holding the prompts (default: 'prompt', else 'caption').")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the best one).")]
DTypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 elsewhere)."),
]
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
NemoGenerationsOpt = Annotated[int | None, typer.Option("--nemo-generations", help="nemo: seeds compared (10).")]
EarlyGuidanceOpt = Annotated[
    float | None, typer.Option("--early-guidance", help="delayed-guidance, embedding-delayed: guidance scale "
                               "before the transition, -10 to 1 (1: the conditional prediction alone, 0: "
                               "unconditional, negative: opposite guidance; default 1, embedding-delayed 0).")]
TargetSlackOpt = Annotated[
    float | None, typer.Option("--target-slack", help="embedding-delayed: stop the optimisation at this times "
                               "--target-loss (1.5).")]
TransitionOpt = Annotated[
    float | None, typer.Option("--transition-timestep", help="delayed-guidance, embedding-delayed: full guidance "
                               "from the first timestep <= this (static rule; default: the first local minimum of "
                               "d_t); embedding-delayed: the earliest (800), each generation from where its d_t "
                               "meets the model's transition curve.")]
LatestOpt = Annotated[
    float | None, typer.Option("--latest-timestep", help="embedding-delayed: full guidance from this timestep at "
                               "the latest, and for every generation when the model has no transition curve (680).")]
VariantOpt = Annotated[
    str | None, typer.Option("--variant", help="initial-noise: batch (adjust the noises, CFG after "
                             "--apply-cfg-step; default) or sample (AdamW per generation to --target-loss).")]
RhoOpt = Annotated[float | None, typer.Option("--rho", help="initial-noise batch: perturbation radius (the "
                                              "authors' 50 for SD v1.4's latent size, scaled to the model's).")]
GammaOpt = Annotated[float | None, typer.Option("--gamma", help="initial-noise batch: step size (0.7).")]
AdjItersOpt = Annotated[int | None, typer.Option("--adj-iters", help="initial-noise batch: adjustments (2).")]
ApplyCfgOpt = Annotated[int | None, typer.Option("--apply-cfg-step", help="initial-noise batch: steps 0..N "
                                                 "sample the unconditional prediction, CFG after (4).")]
NoiseItersOpt = Annotated[int | None, typer.Option("--noise-iters", help="initial-noise sample: at most this many "
                                                   "AdamW steps (1000).")]
NoiseLrOpt = Annotated[float | None, typer.Option("--noise-lr", help="initial-noise sample: AdamW's learning rate "
                                                  "(0.01).")]
ParaphrasesOpt = Annotated[
    Path | None, typer.Option("--paraphrases", help="prss: JSON object mapping each prompt to a list of "
                              "paraphrases (`diffmem testbed mitigation` writes the testbed's).")]
SearchTargetOpt = Annotated[float | None, typer.Option("--search-target", help="prss: sample the first paraphrase "
                                                       "whose first-step score is <= this (1/3 of the model's target "
                                                       "loss; 1 on SD v1.4).")]
AnchorTargetOpt = Annotated[float | None, typer.Option("--anchor-target", help="prss: re-anchor steps whose d_t "
                                                       "is above this (the model's target loss; 3 on SD v1.4).")]
AnchorFullOpt = Annotated[float | None, typer.Option("--anchor-full", help="prss: d_t of full re-anchoring (5/3 "
                                                     "of the model's target loss; 5 on SD v1.4).")]


def parse_threshold(text: str) -> float:
    """`--threshold` as a float, with a one-line error for anything that is not a number."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--threshold must be a number, not {text!r}") from None
    if math.isnan(value):
        raise InputError("--threshold must be a number, not nan")
    return value


def _own_threshold(model: str) -> float:
    """The guard's threshold when --threshold is left out: the model's own calibrated `detection_threshold` (its
    diffmem.json, read before loading), said on stderr; without one, the one-line error asking for --threshold."""
    from diffmem.models.defaults import ModelDefaults

    defaults = ModelDefaults.for_model(model)
    if defaults.detection_threshold is None:
        raise InputError("--guard needs --threshold (calibrate one with `diffmem evaluate`); this model's "
                         "diffmem.json names no detection_threshold")
    typer.echo(f"notice: --guard flags scores >= {defaults.detection_threshold:g}, the model's own detection "
               f"threshold ({defaults.where('detection_threshold')})", err=True)
    return defaults.detection_threshold


def _settings(model: str, method: str, generation: dict[str, Any], keywords: dict[str, Any],
              options: dict[str, Any]) -> dict[str, Any]:
    """The run's settings, as its rows record them, every value checked before the model loads: the generation
    (`GenerationConfig`), `generate`'s keyword options and the method's other options (`method_options`, for a
    method that has any; one it does not take is an error); the guidance scale and target loss are the model's own
    unless given (`ModelDefaults`, read from its folder; a scale of 1 or less, Flux's own, is refused)."""
    from diffmem.mitigate.base import KEYWORDS, MITIGATIONS, GenerationConfig, keyword_settings
    from diffmem.models.defaults import ModelDefaults

    kind = MITIGATIONS.lookup(method, "--method")
    GenerationConfig(**generation)
    kind.configure(keywords, options)
    defaults = ModelDefaults.for_model(model)
    settings = {**generation, "guidance_scale": defaults.resolve_guided(generation["guidance_scale"], "generation"),
                **keyword_settings(keywords)}
    settings["target_loss"] = defaults.resolve_target_loss(settings["target_loss"])
    settings = {k: v for k, v in settings.items() if k in generation or k in keywords}
    if kind.Config.names() - set(KEYWORDS):
        settings["method_options"] = {k: v for k, v in options.items() if v is not None}
    return settings


def generate(
    prompts: PromptsOpt,
    out: OutOpt,
    model: ModelOpt = "testbed",
    guard: Annotated[
        bool, typer.Option("--guard", help="Mitigate (with --method) prompts scoring >= --threshold.")
    ] = False,
    method: Annotated[
        str | None, typer.Option("--method", help=f"The guard's mitigation (`diffmem methods` lists them; default "
                                 f"{DEFAULT_MITIGATION}, on Flux {DEFAULT_WITHOUT_CFG_BATCH}).")
    ] = None,
    threshold: Annotated[
        str | None,
        typer.Option("--threshold", help="Detection threshold (see `diffmem evaluate`); --guard without it uses "
                     "the model's own calibrated one (detection_threshold in its diffmem.json). Without --guard the "
                     "rows only record which prompts it flags."),
    ] = None,
    seed: SeedOpt = 0,
    generations: GenerationsOpt = 1,
    num_inference_steps: StepsOpt = None,
    steps: OldStepsOpt = None,
    guidance: GuidanceOpt = None,
    target_loss: TargetOpt = None,
    iters: ItersOpt = None,
    lr: LrOpt = None,
    column: ColumnOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate images for every prompt; with --guard, prompts whose first-step score is >= --threshold are
    mitigated (by default their text embedding optimised, then guidance delayed: embedding-delayed); the others
    cost no extra denoiser call and give the plain images."""
    from diffmem.mitigate.base import MITIGATIONS

    num_inference_steps = renamed(num_inference_steps, steps, "--steps", "--num-inference-steps", 50)
    flag_at = None if threshold is None else parse_threshold(threshold)
    if guard and flag_at is None:
        flag_at = _own_threshold(model)
    guarding = [name for name, kind in MITIGATIONS.items() if not kind.plain]
    if method is not None and method not in guarding:
        raise InputError(f"--method must be one of {', '.join(guarding)}, not {method!r}")
    if method is not None and not guard:
        raise InputError("--method chooses the guard's mitigation: give --guard too")
    if method is None:
        from diffmem.mitigate.base import default_mitigation
        from diffmem.models.defaults import ModelDefaults
        from diffmem.models.families import FAMILIES

        method = default_mitigation(FAMILIES.get(ModelDefaults.for_model(model).pipeline or ""))
    generation = dict(threshold=flag_at, generations=generations, seed=seed,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance)
    settings = _settings(model, method, generation, dict(target_loss=target_loss, iters=iters, lr=lr), {})
    run_generation(prompts, out, model, method if guard else "none", settings, column, device, dtype, allow_pickle,
                   echo=typer.echo)


def mitigate(
    prompts: PromptsOpt,
    out: OutOpt,
    method: Annotated[str, typer.Option("--method", help="The mitigation (`diffmem methods` lists them).")],
    model: ModelOpt = "testbed",
    target_loss: TargetOpt = None,
    iters: ItersOpt = None,
    lr: LrOpt = None,
    k: Annotated[int | None, typer.Option("--k", help="rta, rna, cwr: words inserted (4).")] = None,
    sigma: Annotated[float | None, typer.Option("--sigma", help="gni: standard deviation of the embedding noise "
                                                "(0.1).")] = None,
    c1: C1Opt = None,
    sail_threshold: SailThresholdOpt = None,
    sail_weight: SailWeightOpt = None,
    nemo_stats: NemoStatsOpt = None,
    nemo_threshold: NemoThresholdOpt = None,
    nemo_generations: NemoGenerationsOpt = None,
    early_guidance: EarlyGuidanceOpt = None,
    transition_timestep: TransitionOpt = None,
    latest_timestep: LatestOpt = None,
    target_slack: TargetSlackOpt = None,
    variant: VariantOpt = None,
    rho: RhoOpt = None,
    gamma: GammaOpt = None,
    adj_iters: AdjItersOpt = None,
    apply_cfg_step: ApplyCfgOpt = None,
    noise_iters: NoiseItersOpt = None,
    noise_lr: NoiseLrOpt = None,
    paraphrases: ParaphrasesOpt = None,
    search_target: SearchTargetOpt = None,
    anchor_target: AnchorTargetOpt = None,
    anchor_full: AnchorFullOpt = None,
    seed: SeedOpt = 0,
    generations: GenerationsOpt = 1,
    num_inference_steps: StepsOpt = None,
    steps: OldStepsOpt = None,
    guidance: GuidanceOpt = None,
    column: ColumnOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate images for every prompt with one mitigation method applied to all of them (for comparisons)."""
    num_inference_steps = renamed(num_inference_steps, steps, "--steps", "--num-inference-steps", 50)
    if nemo_stats is not None and not nemo_stats.is_file():
        raise InputError(f"--nemo-stats {nemo_stats}: no such file")
    generation = dict(threshold=None, generations=generations, seed=seed, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance)
    options = dict(c1=c1, sail_threshold=sail_threshold, sail_weight=sail_weight,
                   nemo_stats=None if nemo_stats is None else str(nemo_stats.resolve()),
                   nemo_threshold=nemo_threshold, nemo_generations=nemo_generations,
                   early_guidance=early_guidance, transition_timestep=transition_timestep,
                   latest_timestep=latest_timestep, target_slack=target_slack, variant=variant, rho=rho,
                   gamma=gamma, adj_iters=adj_iters, apply_cfg_step=apply_cfg_step, noise_iters=noise_iters,
                   noise_lr=noise_lr, paraphrases=None if paraphrases is None else str(paraphrases.resolve()),
                   search_target=search_target, anchor_target=anchor_target, anchor_full=anchor_full)
    settings = _settings(model, method, generation,
                         dict(target_loss=target_loss, iters=iters, lr=lr, k=k, sigma=sigma), options)
    if paraphrases is not None:  # every prompt needs an entry: say so before the model loads
        from diffmem.io.prompts import read_prompts
        from diffmem.mitigate.prss import check_coverage

        check_coverage(read_prompts(prompts, column), paraphrases.resolve())
    run_generation(prompts, out, model, method, settings, column, device, dtype, allow_pickle, echo=typer.echo)
