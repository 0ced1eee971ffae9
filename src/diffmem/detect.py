"""Memorization detection by text-conditional noise magnitude (Wen et al., ICLR 2024; METHOD.md section 1).

`d_t = || eps(x_t, prompt) - eps(x_t, "") ||_2` over the whole latent; a prompt's score is the mean of `d_t`
over the chosen steps and generations. Scoring batches prompts x generations, with a single device-to-host copy
per batch; at the first step the empty prompt's prediction is shared by every prompt (same noise), so it is computed
once and each batch runs the denoiser on its conditional rows only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffmem.epsilon import to_epsilon
from diffmem.errors import InputError

Steps = str | int  # "first", "all" or a number k of leading steps


@dataclass
class PromptScore:
    """One prompt's detection result; `magnitudes[g][s]` is `d_t` for generation g at scored step s."""

    prompt: str
    score: float | None
    magnitudes: list[list[float | None]]
    seed: int
    n_tokens: int
    truncated: bool
    truncated_text: str = ""
    timesteps: list[float] = field(default_factory=list)
    error: str | None = None

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


def initial_noise(pipe, generations: int, seed: int, height: int | None = None, width: int | None = None):
    """Initial latents `x_T` for generations 0..n-1: generation g uses `torch.Generator().manual_seed(seed + g)`.

    The same noise serves every prompt, so a score depends on neither batch size nor batch composition, and a
    plain `pipe(..., latents=noise[g:g+1])` call reproduces exactly the trajectory that was scored.
    """
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + g)) for g in range(generations)]
    return torch.cat(noise)


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
    """The conditioning tensor the pipeline feeds to cross-attention for each prompt (truncated to the encoder)."""
    tok = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    device = pipe.text_encoder.device
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = tok.attention_mask.to(device)
    return pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(pipe.unet.dtype)


class MagnitudeDetector:
    """Wen et al.'s detector: scores prompts by the text-conditional noise magnitude of the denoiser.

    Like a scikit-learn estimator it holds its settings; `score(prompts)` returns one `PromptScore` each.
    `batch_size` counts (prompt, generation) rows: a batch runs batch_size denoiser evaluations at the first step
    and 2 x batch_size at each later one.
    """

    name = "wen"

    def __init__(
        self,
        pipe,
        steps: Steps = "first",
        generations: int = 1,
        seed: int = 0,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        batch_size: int = 32,
    ) -> None:
        if generations < 1:
            raise InputError(f"--generations must be at least 1, not {generations}")
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {batch_size}")
        if num_inference_steps < 1:
            raise InputError(f"--num-inference-steps must be at least 1, not {num_inference_steps}")
        if not math.isfinite(guidance_scale):
            raise InputError(f"--guidance must be a finite number, not {guidance_scale}")
        self.pipe = pipe
        self.n_steps = parse_steps(steps, num_inference_steps)
        self.steps = steps
        self.generations = generations
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.batch_size = batch_size
        self._uncond: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self._uncond_pred: torch.Tensor | None = None

    def score(self, prompts: Sequence[str]) -> list[PromptScore]:
        """Score every prompt (see `iter_scores` to consume results batch by batch)."""
        return list(self.iter_scores(prompts))

    def iter_scores(self, prompts: Sequence[str]) -> Iterator[PromptScore]:
        """Yield each prompt's score in input order, one batch of prompts at a time."""
        per_batch = max(1, self.batch_size // self.generations)
        for start in range(0, len(prompts), per_batch):
            chunk = list(prompts[start : start + per_batch])
            yield from self._score_batch(chunk)

    @torch.no_grad()
    def magnitudes(self, cond: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """`d_t` for conditioning rows `cond` (one per prompt) x generations: shape (prompts, generations, steps).

        At the first step every prompt starts from the same noise, so `eps(x_T, "")` of generation g is the
        same for all of them: it is computed once per detector and the denoiser runs on the conditional rows
        only, half a CFG batch. Later steps, where trajectories differ per prompt, run the full CFG batch.
        """
        pipe, n = self.pipe, self.generations
        device = pipe.unet.device
        uncond = self._empty_embedding()
        rows = cond.shape[0] * n
        cond = cond.repeat_interleave(n, dim=0)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        latents = self._initial_noise().to(device, pipe.unet.dtype) * scheduler.init_noise_sigma
        latents = latents.repeat(rows // n, 1, 1, 1)
        out, timesteps = [], []
        for i, t in enumerate(scheduler.timesteps[: self.n_steps]):
            if i == 0:
                model_in = scheduler.scale_model_input(latents, t)
                pred_c = pipe.unet(model_in, t, encoder_hidden_states=cond, return_dict=False)[0]
                pred_u = self._first_uncond(model_in[:n], t).repeat(rows // n, 1, 1, 1)
            else:
                model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                embeds = torch.cat([uncond.expand(rows, -1, -1), cond])
                pred_u, pred_c = pipe.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
                model_in = model_in[:rows]
            eps_u = to_epsilon(pred_u, model_in, t, scheduler)
            eps_c = to_epsilon(pred_c, model_in, t, scheduler)
            out.append((eps_c - eps_u).flatten(1).norm(dim=1))
            timesteps.append(t)
            if len(out) < self.n_steps:
                guided = pred_u + self.guidance_scale * (pred_c - pred_u)
                latents = scheduler.step(guided, t, latents, return_dict=False)[0]
        mags = torch.stack(out, dim=1).reshape(-1, n, len(out))
        return mags, [float(t) for t in torch.stack(timesteps).cpu()]

    def _score_batch(self, prompts: list[str]) -> list[PromptScore]:
        info = token_info(self.pipe.tokenizer, prompts)
        with torch.no_grad():
            cond = encode_text(self.pipe, prompts)
        mags, timesteps = self.magnitudes(cond)
        mags_cpu = mags.double().cpu()  # the one host copy per batch
        results = []
        for prompt, m, (n_tokens, truncated, cut) in zip(prompts, mags_cpu, info, strict=True):
            finite = bool(torch.isfinite(m).all())
            results.append(
                PromptScore(
                    prompt=prompt,
                    score=float(m.mean()) if finite else None,
                    magnitudes=[[float(v) if math.isfinite(v) else None for v in g] for g in m.tolist()],
                    seed=self.seed,
                    n_tokens=n_tokens,
                    truncated=truncated,
                    truncated_text=cut,
                    timesteps=timesteps,
                    error=None if finite else "non-finite denoiser output (NaN/inf; fp16 overflow?)",
                )
            )
        return results

    def _empty_embedding(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = encode_text(self.pipe, [""])
        return self._uncond

    def _first_uncond(self, model_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for the empty prompt at the first step, one row per generation (computed once)."""
        if self._uncond_pred is None:
            embeds = self._empty_embedding().expand(model_in.shape[0], -1, -1)
            self._uncond_pred = self.pipe.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        return self._uncond_pred

    def _initial_noise(self) -> torch.Tensor:
        if self._noise is None:
            self._noise = initial_noise(self.pipe, self.generations, self.seed)
        return self._noise


def detect(pipe, prompts: Sequence[str], **settings) -> list[PromptScore]:
    """Score `prompts` with `MagnitudeDetector(pipe, **settings)`; the one-call entry point."""
    return MagnitudeDetector(pipe, **settings).score(prompts)


def iter_data_parallel(
    detector: MagnitudeDetector, prompts: Sequence[str], state: Any = None
) -> Iterator[tuple[list[PromptScore], list[int]]]:
    """Score `prompts` data-parallel over accelerate's processes (`state`: a `PartialState`; None: one process).

    Every process walks the same global batches of `num_processes` x (prompts per batch); process r scores the
    r-th contiguous slice of each, and the slices are gathered in rank order, which is input order. Yields per
    global batch its scores (on every process) and how many each process scored. Call it on every process.
    """
    n_proc = state.num_processes if state is not None else 1
    rank = state.process_index if state is not None else 0
    per = max(1, detector.batch_size // detector.generations)
    for start in range(0, len(prompts), per * n_proc):
        mine = list(prompts[start + rank * per : start + (rank + 1) * per])
        scores = detector.score(mine) if mine else []
        if n_proc == 1:
            yield scores, [len(scores)]
            continue
        from accelerate.utils import gather_object

        parts = gather_object([scores])  # one list per process, in rank order
        yield [s for part in parts for s in part], [len(part) for part in parts]
