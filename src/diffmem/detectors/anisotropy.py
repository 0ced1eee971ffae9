"""Asthana & Belagiannis (ICLR 2026; METHOD.md section 6): the first-step magnitude plus a low-noise
anisotropy term."""

from __future__ import annotations

import math

import torch

from diffmem.detectors.base import Detector
from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning


class AnisotropyDetector(Detector):
    """Asthana & Belagiannis (ICLR 2026): `d_T` plus `cosine_weight` x the anisotropy term, on pure noise.

    The anisotropy term is the cosine, over latent channels and averaged over latent pixels, between `eps_u` and
    `eps_c - eps_u` at a low-noise timestep (`cosine_step` of the sampling schedule; the authors take the third
    from last), evaluated on the same pure-noise input as the first step: at low noise a memorized prompt's
    guidance points along the unconditional score. Both terms are in epsilon space (the cosine does not depend
    on the scale, so it equals the authors' score-space one). Scores are `mean_g d_T + cosine_weight *
    mean_g cos`; the authors' weights are 2.0 for SD v1.4 (norm weight 1), 0.1 for SD v2 in their units.
    Cost: 2 conditional evaluations per prompt and generation, plus 2 shared empty-prompt ones per detector.
    `timesteps` names the first step, where `magnitudes` is read; the cosine's timestep follows from `cosine_step`.
    """

    name = "anisotropy"

    def __init__(
        self,
        pipe,
        generations: int = 1,
        seed: int = 0,
        cosine_weight: float = 2.0,
        cosine_step: int = -3,
        num_inference_steps: int = 50,
        batch_size: int = 32,
    ) -> None:
        super().__init__(pipe, generations, seed, num_inference_steps, batch_size)
        if not math.isfinite(cosine_weight):
            raise InputError(f"--cosine-weight must be a finite number, not {cosine_weight}")
        if not -num_inference_steps <= cosine_step < num_inference_steps:
            raise InputError(f"cosine_step {cosine_step} is outside a schedule of {num_inference_steps} steps")
        self.cosine_weight = cosine_weight
        self.cosine_step = cosine_step

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        scheduler = self._schedule()
        noise = self._first_input(scheduler)
        t_first, t_low = scheduler.timesteps[0], scheduler.timesteps[self.cosine_step]
        eps_c, eps_u = self._eps_on_noise(noise, t_first, cond, scheduler)
        mags = (eps_c - eps_u).flatten(1).norm(dim=1).reshape(-1, self.generations, 1)
        eps_c, eps_u = self._eps_on_noise(noise, t_low, cond, scheduler)
        cos = torch.nn.functional.cosine_similarity(eps_u, eps_c - eps_u, dim=1).mean(dim=(1, 2))
        return mags, [float(t_first)], cos.reshape(-1, self.generations)

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return mags.mean(dim=(1, 2)) + self.cosine_weight * terms.mean(dim=1)
