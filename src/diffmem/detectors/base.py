"""Memorization detectors, one small class each, sharing one shape (settings in `__init__`, `score(prompts)`).

`MagnitudeDetector` is Wen et al. (ICLR 2024; METHOD.md section 1): `d_t = || eps(x_t, prompt) - eps(x_t, "") ||_2`
over the whole latent, a prompt's score the mean of `d_t` over the chosen steps and generations.
`AnisotropyDetector` (Asthana & Belagiannis, ICLR 2026) and `SharpnessDetector` (Jeon et al., ICML 2025) are
peers from METHOD.md section 6. Scoring batches prompts x generations, with a single device-to-host copy per
batch; on the shared initial noise the empty prompt's prediction is the same for every prompt, so it is computed
once per detector and timestep.

A detector's settings are one frozen `DetectorConfig` subclass (its `Config`), checked once when built; the class
carries its metadata (name, paper, published figures, cost, minimum generations) and registers itself in
`DETECTORS` when defined, so a new detector is one module of `diffmem.detectors` (docs/extending/detector.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffmem.config import SamplingConfig, and_join, config_of, setting
from diffmem.errors import InputError, UnsupportedModelError
from diffmem.io.files import check_prompts
from diffmem.models.conditioning import Conditioning, encode, text_window
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise
from diffmem.models.families import unet_only
from diffmem.registry import MethodRegistry

Steps = str | int  # "first", "all" or a number k of leading steps


@dataclass
class PromptScore:
    """One prompt's detection result; `magnitudes[g][s]` is `d_t` for generation g at scored step s, and
    `terms[g]` a peer detector's own quantity for generation g (anisotropy: the low-noise cosine; sharpness:
    `||H_delta s_delta||^2`), None for Wen's detector."""

    prompt: str
    score: float | None
    magnitudes: list[list[float | None]]
    seed: int
    n_tokens: int
    truncated: bool
    truncated_text: str = ""
    timesteps: list[float] = field(default_factory=list)
    error: str | None = None
    terms: list[float | None] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_steps(steps: Steps, num_inference_steps: int) -> int:
    """Number of leading sampling steps to score: `first` -> 1, `all` -> T, k -> k (1 <= k <= T)."""
    if isinstance(steps, bool) or not isinstance(steps, str | int):
        raise InputError(f"--steps must be 'first', 'all' or a positive whole number, not {steps!r}")
    if isinstance(steps, str):
        key = steps.strip().lower()
        if key == "first":
            return 1
        if key == "all":
            return num_inference_steps
        if not key.isdigit():
            raise InputError(f"--steps must be 'first', 'all' or a positive whole number, not {steps!r}")
        steps = int(key)
    if not 1 <= int(steps) <= num_inference_steps:
        raise InputError(f"--steps {steps} must be between 1 and num_inference_steps ({num_inference_steps})")
    return int(steps)


def token_info(tokenizer, prompts: Sequence[str], limit: int | None = None) -> list[tuple[int, bool, str]]:
    """Per prompt: real token count (without BOS/EOS), whether it exceeds the encoder's `limit` of them (CLIP's
    77 less BOS and EOS unless given: `diffmem.models.conditioning.text_window`), and the cut-off text."""
    limit = tokenizer.model_max_length - 2 if limit is None else limit
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids
    info = []
    for row in ids:
        cut = tokenizer.decode(row[limit:]) if len(row) > limit else ""
        info.append((len(row), len(row) > limit, cut))
    return info


def encode_text(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The conditioning tensor the pipeline feeds to cross-attention for each prompt (truncated to the encoder);
    `diffmem.models.conditioning.encode` gives the whole conditioning (SDXL's pooled embeddings and time ids too)."""
    return encode(pipe, prompts).prompt_embeds


MAX_BATCH = 65_536
"""Most (prompt, generation) rows per denoiser call."""


@dataclass(frozen=True)
class DetectorConfig(SamplingConfig):
    """The settings every detector shares: generations, seed, schedule and rows per denoiser call."""

    batch_size: int = setting(32, option="--batch-size", ge=1, le=MAX_BATCH)

    @property
    def n_steps(self) -> int:
        """The scored-steps setting result rows record (1: the detector reads one step, or its own)."""
        return 1

    def resolved(self, defaults: ModelDefaults) -> DetectorConfig:
        """These settings with what was left to the model (the guidance scale) taken from `defaults`."""
        return self


@dataclass(frozen=True)
class GuidedConfig(DetectorConfig):
    """A detector that samples with classifier-free guidance (None: the model's own scale)."""

    guidance_scale: float | None = setting(None, option="--guidance", gt=1, says="above 1 (classifier-free guidance)")

    def resolved(self, defaults: ModelDefaults) -> GuidedConfig:
        # a guidance-distilled model's own scale (Flux: 1, its true CFG off) is refused; the option is above 1
        return self.replace(guidance_scale=defaults.resolve_guided(self.guidance_scale, "this detector"))


@dataclass(frozen=True)
class SteppedConfig(DetectorConfig):
    """A detector that scores the leading `steps` sampling steps: 'first', 'all' or a number k."""

    steps: str | int = setting("first", option="--steps")

    def check(self) -> None:
        super().check()
        parse_steps(self.steps, self.num_inference_steps)

    @property
    def n_steps(self) -> int:
        return parse_steps(self.steps, self.num_inference_steps)


DETECTORS: MethodRegistry[Detector] = MethodRegistry("detector")
"""Every detector by its `--detector` name, in listing order; a `Detector` subclass with a `name` joins when it is
defined (`diffmem.detectors` imports every module of the package)."""


class Detector:
    """What every detector shares: the settings that fix a score, batching, and the cached empty-prompt branch.

    Like a scikit-learn estimator it holds its settings (`config`, one `Config`, given as keywords or built);
    `score(prompts)` returns one `PromptScore` each. A subclass implements `_measure` (its per-generation
    quantities for a batch of conditioning rows) and `_combine` (those quantities to one score per prompt), and
    sets its metadata; `batch_size` counts (prompt, generation) rows.
    """

    name: ClassVar[str] = ""
    """The `--detector` name; a subclass that sets one is registered in `DETECTORS`."""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    """Its settings."""
    scores: ClassVar[str] = "the first step"
    """Which sampling steps the score reads: the first step, leading steps (`--steps`), or a whole trajectory."""
    cost: ClassVar[str] = ""
    """Its cost in denoiser evaluations, in words."""
    paper: ClassVar[str] = ""
    """Where it is published."""
    published: ClassVar[str] = ""
    """Its published SD v1.4 figures (the 500 memorized prompts of Webster 2023), as the paper states them."""
    rank: ClassVar[int] = 1000
    """Position in listings and tables (lower first)."""
    min_generations: ClassVar[int] = 1
    """Fewest generations it can score with (from its Config's `--generations` range)."""
    min_references: ClassVar[int] = 2
    """Fewest non-memorized prompts `diffmem compare` can evaluate it on."""
    note: ClassVar[str] = ""
    """What `diffmem compare` notes under its table (how its row was evaluated, when that differs)."""
    reads_unet_attention: ClassVar[bool] = False
    """Whether it reads UNet cross-attention maps, which SD3, PixArt and Flux do not have (`unsupported`)."""
    config: DetectorConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.min_generations = int(cls.Config.rule("generations").ge or 1)
        if cls.__dict__.get("name"):
            DETECTORS.add(cls)

    def __init__(self, pipe, config: DetectorConfig | None = None, **settings: Any) -> None:
        config = config_of(type(self), config, settings)
        if reason := self.unsupported(pipe):
            raise UnsupportedModelError(reason)
        self.pipe = pipe
        self.config = config.resolved(ModelDefaults.of(pipe))
        self.denoiser = Denoiser(pipe)
        self._noise: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        """A setting by name (`detector.generations`), read from `config`."""
        config = self.__dict__.get("config")
        if config is not None and name in config.names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def unsupported(cls, pipe: Any) -> str | None:
        """Why this detector cannot score `pipe`'s model, in one line (e.g. for `diffmem compare`'s n/a), else
        None."""
        return unet_only(pipe, f"the {cls.name} detector") if cls.reads_unet_attention else None

    @classmethod
    def configure(cls, values: Mapping[str, Any]) -> DetectorConfig:
        """Its `Config` from user values (None: the default); a setting another detector takes is one line naming
        the detectors it applies to."""
        names = cls.Config.names()
        for key, value in values.items():
            if value is None or key in names:
                continue
            takers = [n for n, c in DETECTORS.items() if key in c.Config.names()]
            option = DETECTORS[takers[0]].Config.rule(key).option if takers else "--" + key.replace("_", "-")
            if not takers:
                raise InputError(f"{option} does not apply to the {cls.name} detector")
            raise InputError(f"{option} applies to the {and_join(takers)} detector{'s' if len(takers) > 1 else ''}; "
                             f"{cls.name} does not take it")
        return cls.Config.from_values(values)

    @classmethod
    def split_scores(cls, memorized: list[dict[str, Any]], normal: list[dict[str, Any]], out: Path
                     ) -> tuple[list[float | None], list[float | None], list[dict[str, Any]]]:
        """The scores `diffmem compare` evaluates from its result rows: memorized, non-memorized, and the
        non-memorized rows they come from (a detector that fits something on part of them overrides this)."""
        return [r["score"] for r in memorized], [r["score"] for r in normal], normal

    def score(self, prompts: Sequence[str]) -> list[PromptScore]:
        """Score every prompt (see `iter_scores` to consume results batch by batch)."""
        return list(self.iter_scores(prompts))

    def iter_scores(self, prompts: Sequence[str]) -> Iterator[PromptScore]:
        """Yield each prompt's score in input order, one batch of prompts at a time. The prompts follow the text
        rule of prompt files and the API (`diffmem.io.files.check_prompts`): a bare string, a non-string, a blank
        prompt, a NUL or another control character, a lone surrogate or over 20,000 characters is an InputError."""
        prompts = check_prompts(prompts)
        per_batch = max(1, self.config.batch_size // self.config.generations)
        for start in range(0, len(prompts), per_batch):
            chunk = list(prompts[start : start + per_batch])
            yield from self._score_batch(chunk)

    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        """Per conditioning row: `d_t` (prompts, generations, steps), its timesteps, and the detector's own
        per-generation terms (prompts, generations) or None."""
        raise NotImplementedError

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        """One score per prompt from what `_measure` returned (on the host, float64)."""
        raise NotImplementedError

    def _score_batch(self, prompts: list[str]) -> list[PromptScore]:
        tokenizer, limit = text_window(self.pipe)
        info = token_info(tokenizer, prompts, limit)
        with torch.no_grad():
            cond = encode(self.pipe, prompts)
        mags, timesteps, terms = self._measure(cond)
        both = mags.flatten(1) if terms is None else torch.cat([mags.flatten(1), terms], dim=1)
        both = both.double().cpu()  # the one host copy per batch
        mags_cpu = both[:, : mags[0].numel()].reshape(mags.shape)
        terms_cpu = None if terms is None else both[:, mags[0].numel() :]
        scores = self._combine(mags_cpu, terms_cpu)
        results = []
        for i, (prompt, (n_tokens, truncated, cut)) in enumerate(zip(prompts, info, strict=True)):
            finite = bool(torch.isfinite(both[i]).all())
            results.append(
                PromptScore(
                    prompt=prompt,
                    score=float(scores[i]) if finite else None,
                    magnitudes=[[_number(v) for v in g] for g in mags_cpu[i].tolist()],
                    seed=self.config.seed,
                    n_tokens=n_tokens,
                    truncated=truncated,
                    truncated_text=cut,
                    timesteps=timesteps,
                    error=None if finite else "non-finite denoiser output (NaN/inf; fp16 overflow?)",
                    terms=None if terms_cpu is None else [_number(v) for v in terms_cpu[i].tolist()],
                )
            )
        return results

    def _schedule(self):
        """A fresh copy of the pipeline's scheduler, set to `num_inference_steps`."""
        return self.denoiser.schedule(self.config.num_inference_steps)

    def _first_input(self, scheduler) -> torch.Tensor:
        """The denoiser input of the first step for generations 0..n-1: the shared pure-noise `x_T`."""
        return self.denoiser.first_input(self._initial_noise(), scheduler)

    def _eps_on_noise(self, model_in: torch.Tensor, t: torch.Tensor, cond: Conditioning, scheduler):
        """`eps_c` and `eps_u` at timestep `t` for conditioning rows `cond` x generations (prompt-major) on the
        shared input `model_in` (one row per generation), in epsilon space; the empty prompt's rows are computed
        once per detector and timestep (`Denoiser.cfg_shared`)."""
        pred_c, pred_u, x = self.denoiser.cfg_shared(model_in, t, cond)
        param = Parameterization.of(scheduler)
        return param.to_epsilon(pred_c, x, t), param.to_epsilon(pred_u, x, t)

    def _empty_embedding(self) -> Conditioning:
        """The empty prompt's conditioning, by the pipeline's own convention (`diffmem.models.conditioning.empty`)."""
        return self.denoiser.empty()

    def _initial_noise(self) -> torch.Tensor:
        if self._noise is None:
            self._noise = initial_noise(self.pipe, self.config.generations, self.config.seed)
        return self._noise


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
