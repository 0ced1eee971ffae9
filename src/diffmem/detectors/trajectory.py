"""What the detectors that read an ordinary generation share: one `pipe(...)` call from the detector's noise.

Generation g of every prompt starts from `initial_noise(pipe, n, seed)[g]`, as in `MagnitudeDetector`, with
classifier-free guidance at the model's scale as its family's pipeline takes it (`Denoiser.call_kwargs`; Flux:
true CFG, so `--guidance` above 1), and a `Monitor` reads `d_t` (and the latent updates) off the CFG batch the
pipeline computes anyway. Attention maps come from processors installed for the call
(`diffmem.models.attention.cross_attention`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from diffmem.detectors.base import Detector, GuidedConfig
from diffmem.detectors.monitor import Monitor
from diffmem.models.attention import AttentionHook, cross_attention
from diffmem.models.conditioning import Conditioning


class TrajectoryDetector(Detector):
    """A `Detector` that scores the whole guided trajectory of an ordinary pipeline call (cost: a generation);
    its guidance scale must be above 1, since it reads the CFG batch."""

    Config = GuidedConfig
    config: GuidedConfig
    scores = "a whole guided generation"
    cost = "a generation (a CFG pair per step) per prompt and generation"

    def __init__(self, pipe: Any, config: GuidedConfig | None = None, **settings: Any) -> None:
        super().__init__(pipe, config, **settings)
        self._prompts: list[str] = []

    def _score_batch(self, prompts: list[str]) -> list:
        self._prompts = prompts  # the batch's text, for scores that need its tokens (the end token's position)
        return super()._score_batch(prompts)

    def _generate(self, cond: Conditioning, output_type: str = "latent", hook: AttentionHook | None = None,
                  keep_differences: bool = False) -> tuple[Any, Monitor]:
        """The pipeline's output for rows `cond` x generations (prompt-major) and the monitor that watched it;
        `hook` sees every cross-attention layer of every step."""
        n, pipe, denoiser = self.config.generations, self.pipe, self.denoiser
        rows = len(cond) * n
        noise = self._initial_noise().to(denoiser.device, denoiser.dtype)
        noise = noise.repeat(len(cond), *(1,) * (noise.dim() - 1))
        negative = self._empty_embedding().expand(rows)
        monitor = Monitor(pipe, keep_differences=keep_differences)
        attention = nullcontext() if hook is None else cross_attention(pipe.unet, hook)
        assert self.config.guidance_scale is not None  # resolved: the model's own unless given
        seeds = [self.config.seed + g for _ in range(len(cond)) for g in range(n)]  # as the noise rows
        with torch.no_grad(), attention, monitor, denoiser.starting_from(noise, seeds) as start:
            out = pipe(**denoiser.call_kwargs(cond.repeat_interleave(n), negative, self.config.guidance_scale),
                       **start, num_inference_steps=self.config.num_inference_steps, output_type=output_type)
        return out.images, monitor

    def _per_prompt(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, ...) as (prompts, generations, ...)."""
        return values.reshape(-1, self.config.generations, *values.shape[1:])
