"""Memorization detectors, one small class each, sharing one shape (settings in `__init__`, `score(prompts)`).

`MagnitudeDetector` is Wen et al. (ICLR 2024; METHOD.md section 1): `d_t = || eps(x_t, prompt) - eps(x_t, "") ||_2`
over the whole latent, a prompt's score the mean of `d_t` over the chosen steps and generations.
`AnisotropyDetector` (Asthana & Belagiannis, ICLR 2026) and `SharpnessDetector` (Jeon et al., ICML 2025) are
peers from METHOD.md section 6. Scoring batches prompts x generations, with a single device-to-host copy per
batch; on the shared initial noise the empty prompt's prediction is the same for every prompt, so it is computed
once per detector and timestep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning, encode
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise

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


def token_info(tokenizer, prompts: Sequence[str]) -> list[tuple[int, bool, str]]:
    """Per prompt: real token count (without BOS/EOS), whether it exceeds the encoder, and the cut-off text."""
    limit = tokenizer.model_max_length - 2
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


class Detector:
    """What every detector shares: the settings that fix a score, batching, and the cached empty-prompt branch.

    Like a scikit-learn estimator it holds its settings; `score(prompts)` returns one `PromptScore` each. A
    subclass implements `_measure` (its per-generation quantities for a batch of conditioning rows) and
    `_combine` (those quantities to one score per prompt). `batch_size` counts (prompt, generation) rows.
    """

    name = ""

    def __init__(
        self, pipe, generations: int = 1, seed: int = 0, num_inference_steps: int = 50, batch_size: int = 32
    ) -> None:
        if generations < 1:
            raise InputError(f"--generations must be at least 1, not {generations}")
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {batch_size}")
        if num_inference_steps < 1:
            raise InputError(f"--num-inference-steps must be at least 1, not {num_inference_steps}")
        self.pipe = pipe
        self.generations = generations
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.batch_size = batch_size
        self.denoiser = Denoiser(pipe)
        self._noise: torch.Tensor | None = None

    def score(self, prompts: Sequence[str]) -> list[PromptScore]:
        """Score every prompt (see `iter_scores` to consume results batch by batch)."""
        return list(self.iter_scores(prompts))

    def iter_scores(self, prompts: Sequence[str]) -> Iterator[PromptScore]:
        """Yield each prompt's score in input order, one batch of prompts at a time."""
        per_batch = max(1, self.batch_size // self.generations)
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
        info = token_info(self.pipe.tokenizer, prompts)
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
                    seed=self.seed,
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
        return self.denoiser.schedule(self.num_inference_steps)

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
            self._noise = initial_noise(self.pipe, self.generations, self.seed)
        return self._noise


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
