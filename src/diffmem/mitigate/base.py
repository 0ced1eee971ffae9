"""What every inference-time mitigation shares: its settings (`GenerationConfig` for the generation, the method's own
`Config` for its options), the shared sampler, and the `Mitigation` class each method is.

A mitigation turns one prompt and the run's initial noise into images through one ordinary pipeline call
(`Sampler`), changed as its authors change it: `Mitigation.apply` returns the images, the final first-step loss,
the text sampled, the optimisation steps, whether a target was reached and details for the result row. A subclass
with a `name` registers itself in `MITIGATIONS` when defined (`diffmem.mitigate` imports every module of the
package), so a new method is one module (docs/extending/mitigation.md).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffmem.config import Config, SamplingConfig, config_of, setting
from diffmem.detectors.monitor import Monitor
from diffmem.errors import InputError, UnsupportedModelError
from diffmem.models.conditioning import Conditioning, empty
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser
from diffmem.models.families import FLUX, UNET, family, unet_only
from diffmem.registry import DEFAULT_MITIGATION, DEFAULT_WITHOUT_CFG_BATCH, MethodRegistry

MAX_ITERS = 10_000
"""Most optimisation steps of a mitigation (the papers take 10)."""


@dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """The generation every method shares: the guard's threshold (None: every prompt is mitigated), the noises,
    the schedule, the guidance scale (None: the model's own) and the pipeline's output type."""

    threshold: float | None = setting(None, option="--threshold", finite=False)
    guidance_scale: float | None = setting(None, option="--guidance", gt=1, says="above 1 (classifier-free guidance)")
    output_type: str = setting("np", option="output_type", choices=("np", "pil", "pt", "latent"))

    def resolved(self, defaults: ModelDefaults) -> GenerationConfig:
        """These settings with the guidance scale left to the model taken from `defaults`; one of 1 or less (Flux's
        own: true CFG off) is refused, as the first-step score reads both guidance branches."""
        return self.replace(guidance_scale=defaults.resolve_guided(self.guidance_scale, "generation"))


@dataclass(frozen=True)
class NoOptions(Config):
    """The options of a method that has none."""

    def resolved(self, defaults: ModelDefaults) -> NoOptions:
        """These options with what was left to the model taken from `defaults` (override where one is)."""
        return self


@dataclass(frozen=True)
class OptimisationConfig(NoOptions):
    """A method that optimises something per prompt: at most `iters` steps of learning rate `lr`."""

    iters: int = setting(10, option="--iters", ge=0, le=MAX_ITERS)
    lr: float = setting(0.05, option="--lr", gt=0, says="a positive number")


@dataclass
class Outcome:
    """What a mitigation made of one prompt: the pipeline's images, the first-step loss of what they were sampled
    with, the text sampled, optimisation steps taken, whether its target was reached (None: it has none) and
    details for the result row."""

    images: Any
    final_loss: float
    text: str
    iters: int = 0
    reached: bool | None = None
    details: dict[str, Any] | None = None


class Flagged(Exception):
    """Raised from the monitor's first-step record to stop a generation whose prompt is to be mitigated."""

    def __init__(self, score: float) -> None:
        super().__init__(score)
        self.score = score


class Sampler:
    """One pipeline call per use, from the run's initial noise, with the first-step score read off its CFG batch
    (`Monitor`; Flux: its true-CFG calls against the empty prompt, `Denoiser.guidance`); the empty prompt's
    conditioning is encoded once, when a method first needs it."""

    def __init__(self, pipe: Any, generation: GenerationConfig, noise: torch.Tensor) -> None:
        self.pipe, self.generation, self.noise = pipe, generation, noise

    @functools.cached_property
    def uncond(self) -> Conditioning:
        """The empty prompt's conditioning."""
        with torch.no_grad():
            return empty(self.pipe)

    @functools.cached_property
    def denoiser(self) -> Denoiser:
        """The pipeline's denoiser (its family's call options)."""
        return Denoiser(self.pipe)

    def __call__(self, noise: torch.Tensor | None = None, abort_at: float | None = None,
                 **conditioning: Any) -> tuple[Any, float]:
        """The images of one call from `noise` (default: the run's) and its first-step score; with `abort_at`, a
        score >= abort_at raises `Flagged` right after the first step. `conditioning`: prompt=..., or
        prompt_embeds=... and negative_prompt_embeds=... (one row, or one per generation)."""
        noise = self.noise if noise is None else noise
        first: list[float] = []

        def on_first_step(magnitudes: torch.Tensor) -> None:
            first.append(float(magnitudes.double().mean()))  # the one host copy of the guard
            if abort_at is not None and first[0] >= abort_at:
                raise Flagged(first[0])

        monitor = Monitor(self.pipe, stop_after=1, on_record=on_first_step)  # later steps run without the hook
        embeds = conditioning.get("prompt_embeds")
        per_prompt = noise.shape[0] if embeds is None or embeds.shape[0] == 1 else 1
        if embeds is not None and per_prompt > 1 and family(self.pipe) != UNET:
            # SD3's pipeline does not repeat given embeddings per image: one row per generation here
            conditioning = {k: v.expand(per_prompt, *v.shape[1:]) if isinstance(v, torch.Tensor) else v
                            for k, v in conditioning.items()}
            per_prompt = 1
        g = self.generation
        assert g.guidance_scale is not None  # resolved
        seeds = range(g.seed, g.seed + noise.shape[0])  # IF's DDPM steps draw noise: seeded per generation
        with monitor, self.denoiser.starting_from(noise, seeds) as start:
            out = self.pipe(**conditioning, **self.denoiser.call_options(embeds is not None),
                            **self.denoiser.guidance(g.guidance_scale, embeds is not None),
                            num_images_per_prompt=per_prompt, **start,
                            num_inference_steps=g.num_inference_steps, output_type=g.output_type)
        return out.images, first[0]


def prompt_seed(seed: int, prompt: str) -> int:
    """The seed of a prompt's random edits: fixed per (seed, prompt), so neither order nor resume changes it, and
    different prompts get different draws."""
    return (seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % 2**63


@dataclass
class Calibrating:
    """What a method may calibrate its model-dependent options on (`diffmem compare`): the pipeline, the
    non-memorized prompts, the run's generation settings, first-step Wen scores already computed (per number of
    generations), the report folder, the values already known (given, or cached there: not computed again), and a
    log."""

    pipe: Any
    normal: list[str]
    generation: SamplingConfig
    batch_size: int
    wen_scores: Mapping[int, list[float]]
    out: Path
    known: Mapping[str, Any]
    log: Callable[[str], None]


MITIGATIONS: MethodRegistry[Mitigation] = MethodRegistry("mitigation")
"""Every mitigation by its `--method` name, in listing order; a `Mitigation` subclass with a `name` joins when it is
defined (`diffmem.mitigate` imports every module of the package)."""
KEYWORDS = ("target_loss", "iters", "lr", "k", "sigma")
"""The options `generate` takes as keywords (every other one in `method_options`); rows record them for every
method."""


def default_mitigation(model_family: str | None) -> str:
    """The mitigation used unless one is named, for a model of `model_family` (`families.family`): diffmem's
    default, or on Flux, whose CFG branches are two calls, Wen et al.'s method alone."""
    return DEFAULT_WITHOUT_CFG_BATCH if model_family == FLUX else DEFAULT_MITIGATION


class Mitigation:
    """One inference-time mitigation: its options (`config`, one `Config`) and `apply`, which turns a prompt into
    images through the shared `Sampler`. Class metadata says what it is, where it is published and what it costs."""

    name: ClassVar[str] = ""
    """The `--method` name; a subclass that sets one is registered in `MITIGATIONS`."""
    Config: ClassVar[type[NoOptions]] = NoOptions
    """Its options."""
    paper: ClassVar[str] = ""
    published: ClassVar[str] = ""
    """Its published SD v1.4 figures, as the paper states them."""
    cost: ClassVar[str] = ""
    """Its cost over a plain generation, in words."""
    rank: ClassVar[int] = 1000
    """Position in listings (lower first)."""
    plain: ClassVar[bool] = False
    """Whether it samples without mitigating (the reference row of every mitigation table, listed first there)."""
    in_paper_table: ClassVar[bool] = False
    """Whether Wen et al.'s mitigation table has it (`diffmem reproduce`'s methods)."""
    calibrated: ClassVar[tuple[str, ...]] = ()
    """The options `calibrate` gives."""
    needs: ClassVar[tuple[str, ...]] = ()
    """Options only the user can give (prss: its paraphrase file): such a method runs when named, never in a table
    of every method (`table_methods`)."""
    reads_unet: ClassVar[bool] = False
    """Whether it reads or edits UNet cross-attention layers, which SD3, PixArt and Flux do not have."""
    runs_on_flux: ClassVar[bool] = False
    """Whether it runs on Flux: it samples only through the `Sampler`'s true-CFG calls (and the `Denoiser`)."""
    config: NoOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            MITIGATIONS.add(cls)

    def __init__(self, pipe: Any, config: NoOptions | None = None, **options: Any) -> None:
        config = config_of(type(self), config, options)
        if reason := self.unsupported(pipe):
            raise UnsupportedModelError(reason)
        self.pipe = pipe
        self.config = config.resolved(ModelDefaults.of(pipe))

    @classmethod
    def unsupported(cls, pipe: Any) -> str | None:
        """Why this method cannot run on `pipe`'s model, in one line, else None: a method that reads UNet layers
        needs a UNet; on Flux (guidance-distilled, true CFG in two calls, no CFG batch to rewrite) only the methods
        that sample through the `Sampler` alone run (`runs_on_flux`)."""
        if cls.reads_unet and (reason := unet_only(pipe, f"the {cls.name} mitigation")):
            return reason
        if family(pipe) == FLUX and not cls.runs_on_flux:
            able = ", ".join(name for name, kind in MITIGATIONS.items() if kind.runs_on_flux)
            return (f"the {cls.name} mitigation is not adapted to Flux's true CFG (two calls, no CFG batch to read or "
                    f"rewrite): use an SD, SDXL, SD3 or PixArt model, or on Flux one of {able}")
        return None

    def prepare(self, prompts: Sequence[str]) -> None:
        """Check what the method needs for `prompts` before any is generated (e.g. a paraphrase of each; raise
        InputError); nothing by default."""

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        """Generate `prompt` from the sampler's noise, mitigated."""
        raise NotImplementedError

    @classmethod
    def configure(cls, values: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> NoOptions:
        """Its `Config` from `generate`'s keyword options `values` (those it does not declare are still checked,
        by the method that declares them) and its `method_options` (one it does not declare is an error)."""
        names = cls.Config.names()
        foreign = sorted(k for k, v in (options or {}).items() if k not in names and v is not None)
        if foreign:
            raise InputError(f"{', '.join(foreign)} do not apply to method {cls.name!r}")
        for key, value in values.items():
            if key not in names and value is not None:
                check_option(key, value)
        return cls.Config.from_values({**values, **(options or {})})

    @classmethod
    def calibrate(cls, context: Calibrating) -> dict[str, Any]:
        """Its options that depend on the model, calibrated on non-memorized prompts (none by default)."""
        return {}


def check_option(key: str, value: Any) -> None:
    """Check one option by the rule of the method that declares it (a method that ignores it still refuses a
    value no method could use)."""
    for cls in MITIGATIONS.values():
        if key in cls.Config.names():
            cls.Config.check_value(key, value)
            return


class PlainSampling(Mitigation):
    """No mitigation: the prompt sampled as it is (the reference row)."""

    name = "none"
    cost = "none"
    rank = 60
    plain = True
    in_paper_table = True
    runs_on_flux = True

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        images, score = sampler(prompt=prompt)
        return Outcome(images, score, prompt)


def finite_or_none(value: float) -> float | None:
    """`value`, or None when it is not finite (what a result row records)."""
    return value if math.isfinite(value) else None


def keyword_settings(given: Mapping[str, Any]) -> dict[str, Any]:
    """`generate`'s keyword options (`KEYWORDS`) as result rows record them for every method: the value given,
    else the default of the method that declares it."""
    out = {}
    for key in KEYWORDS:
        value = given.get(key)
        if value is None:
            value = next((getattr(cls.Config(), key) for cls in MITIGATIONS.values() if key in cls.Config.names()),
                         None)
        out[key] = value
    return out


def table_methods(*, paper: bool = False) -> tuple[str, ...]:
    """Method names in table order, plain sampling (the reference row) first: every registered method that needs
    nothing only the user can give, or with `paper` those of Wen et al.'s table (`diffmem reproduce`'s default)."""
    names = [name for name, cls in MITIGATIONS.items() if (cls.in_paper_table or not paper) and not cls.needs]
    return tuple(sorted(names, key=lambda name: not MITIGATIONS[name].plain))
