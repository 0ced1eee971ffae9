"""What the detectors that read an ordinary generation share: one `pipe(...)` call from the detector's noise.

Generation g of every prompt starts from `initial_noise(pipe, n, seed)[g]`, as in `MagnitudeDetector`, with
classifier-free guidance at the model's scale, and a `Monitor` reads `d_t` (and the latent updates) off the CFG
batch the pipeline computes anyway. Attention maps come from processors installed for the call
(`diffmem.models.attention.cross_attention`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from diffmem.detectors.base import Detector
from diffmem.detectors.monitor import Monitor
from diffmem.errors import InputError
from diffmem.models.attention import AttentionHook, cross_attention
from diffmem.models.conditioning import Conditioning
from diffmem.models.defaults import ModelDefaults


class TrajectoryDetector(Detector):
    """A `Detector` that scores the whole guided trajectory of an ordinary pipeline call (cost: a generation)."""

    def __init__(self, pipe: Any, generations: int = 1, seed: int = 0, guidance_scale: float | None = None,
                 num_inference_steps: int = 50, batch_size: int = 32) -> None:
        super().__init__(pipe, generations, seed, num_inference_steps, batch_size)
        self._prompts: list[str] = []
        self.guidance_scale = ModelDefaults.of(pipe).resolve_guidance(guidance_scale)
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale > 1):
            raise InputError(f"--guidance must be above 1 for {self.name} (it reads the CFG batch), "
                             f"not {self.guidance_scale}")

    def _score_batch(self, prompts: list[str]) -> list:
        self._prompts = prompts  # the batch's text, for scores that need its tokens (the end token's position)
        return super()._score_batch(prompts)

    def _generate(self, cond: Conditioning, output_type: str = "latent", hook: AttentionHook | None = None,
                  keep_differences: bool = False) -> tuple[Any, Monitor]:
        """The pipeline's output for rows `cond` x generations (prompt-major) and the monitor that watched it;
        `hook` sees every cross-attention layer of every step."""
        n, pipe = self.generations, self.pipe
        rows = len(cond) * n
        noise = self._initial_noise().to(pipe.unet.device, pipe.unet.dtype).repeat(len(cond), 1, 1, 1)
        negative = self._empty_embedding().expand(rows)
        monitor = Monitor(pipe, keep_differences=keep_differences)
        attention = nullcontext() if hook is None else cross_attention(pipe.unet, hook)
        with torch.no_grad(), attention, monitor:
            out = pipe(**cond.repeat_interleave(n).pipe_kwargs(negative), latents=noise,
                       num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                       output_type=output_type)
        return out.images, monitor

    def _per_prompt(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, ...) as (prompts, generations, ...)."""
        return values.reshape(-1, self.generations, *values.shape[1:])
