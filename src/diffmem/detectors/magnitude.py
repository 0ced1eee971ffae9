"""Wen et al.'s detector (ICLR 2024; METHOD.md section 1): `d_t = || eps(x_t, prompt) - eps(x_t, "") ||_2` over
the whole latent, a prompt's score the mean of `d_t` over the chosen steps and generations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffmem.detectors.base import Detector, PromptScore, Steps, parse_steps
from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning, as_conditioning
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Parameterization


class MagnitudeDetector(Detector):
    """Wen et al.'s detector: scores prompts by the text-conditional noise magnitude of the denoiser.

    A batch runs batch_size denoiser evaluations at the first step and 2 x batch_size at each later one.
    """

    name = "wen"

    def __init__(
        self,
        pipe,
        steps: Steps = "first",
        generations: int = 1,
        seed: int = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        batch_size: int = 32,
    ) -> None:
        super().__init__(pipe, generations, seed, num_inference_steps, batch_size)
        guidance_scale = ModelDefaults.of(pipe).resolve_guidance(guidance_scale)  # the model's own unless given
        if not math.isfinite(guidance_scale):
            raise InputError(f"--guidance must be a finite number, not {guidance_scale}")
        self.n_steps = parse_steps(steps, num_inference_steps)
        self.steps = steps
        self.guidance_scale = guidance_scale

    @torch.no_grad()
    def magnitudes(self, cond: Conditioning | torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """`d_t` for conditioning rows `cond` (one per prompt; a bare tensor for SD) x generations: shape
        (prompts, generations, steps).

        At the first step every prompt starts from the same noise, so `eps(x_T, "")` of generation g is the
        same for all of them: it is computed once per detector and the denoiser runs on the conditional rows
        only, half a CFG batch. Later steps, where trajectories differ per prompt, run the full CFG batch.
        """
        denoiser, n = self.denoiser, self.generations
        cond = as_conditioning(self.pipe, cond)
        uncond = self._empty_embedding()
        rows = len(cond) * n
        scheduler = self._schedule()
        param = Parameterization.of(scheduler)
        first = self._first_input(scheduler)
        latents = (self._initial_noise().to(first) * scheduler.init_noise_sigma).repeat(rows // n, 1, 1, 1)
        out, timesteps = [], []
        for i, t in enumerate(scheduler.timesteps[: self.n_steps]):
            if i == 0:
                pred_c, pred_u, model_in = denoiser.cfg_shared(first, t, cond)
            else:
                model_in = scheduler.scale_model_input(latents, t)
                pred_c, pred_u = denoiser.cfg(model_in, t, cond.repeat_interleave(n), uncond.expand(rows))
            eps_u = param.to_epsilon(pred_u, model_in, t)
            eps_c = param.to_epsilon(pred_c, model_in, t)
            out.append((eps_c - eps_u).flatten(1).norm(dim=1))
            timesteps.append(t)
            if len(out) < self.n_steps:
                guided = pred_u + self.guidance_scale * (pred_c - pred_u)
                latents = scheduler.step(guided, t, latents, return_dict=False)[0]
        mags = torch.stack(out, dim=1).reshape(-1, n, len(out))
        return mags, [float(t) for t in torch.stack(timesteps).cpu()]

    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        mags, timesteps = self.magnitudes(cond)
        return mags, timesteps, None

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        return mags.mean(dim=(1, 2))


def detect(pipe, prompts: Sequence[str], **settings) -> list[PromptScore]:
    """Score `prompts` with `MagnitudeDetector(pipe, **settings)`; the one-call entry point."""
    return MagnitudeDetector(pipe, **settings).score(prompts)
