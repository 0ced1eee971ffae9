"""Asthana & Belagiannis (ICLR 2026; METHOD.md section 6): the first-step magnitude plus a low-noise
anisotropy term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffmem.config import setting
from diffmem.detectors.base import Detector, DetectorConfig
from diffmem.errors import InputError, UnsupportedModelError
from diffmem.models.conditioning import Conditioning
from diffmem.models.denoiser import Parameterization


@dataclass(frozen=True)
class AnisotropyConfig(DetectorConfig):
    """The weight of the anisotropy term and the schedule step of its cosine (-3: the third from last)."""

    cosine_weight: float = setting(2.0, option="--cosine-weight")
    cosine_step: int = setting(-3, option="cosine_step")

    def check(self) -> None:
        super().check()
        if not -self.num_inference_steps <= self.cosine_step < self.num_inference_steps:
            raise InputError(f"cosine_step {self.cosine_step} is outside a schedule of {self.num_inference_steps} "
                             "steps")


class AnisotropyDetector(Detector):
    """Asthana & Belagiannis (ICLR 2026): `d_T` plus `cosine_weight` x the anisotropy term, on pure noise.

    The anisotropy term is the cosine, over latent channels and averaged over latent pixels, between `eps_u` and
    `eps_c - eps_u` at a low-noise timestep (`cosine_step` of the sampling schedule; the authors take the third
    from last), evaluated on the same pure-noise input as the first step: at low noise a memorized prompt's
    guidance points along the unconditional score. Both terms are in epsilon space (the cosine does not depend
    on the scale, so it equals the authors' score-space one). On a rectified-flow model (SD3, Flux) `d_T` is read
    through `Parameterization.to_score`, the velocity (its noise prediction at `s = 1` is the input for every
    prompt), and the cosine stays in epsilon space, the score's direction (`-eps / s`) at `s < 1`; a `cosine_step`
    at `s = 1` (a schedule of as few steps) is refused. Scores are `mean_g d_T + cosine_weight *
    mean_g cos`; the authors' weights are 2.0 for SD v1.4 (norm weight 1), 0.1 for SD v2 in their units.
    Cost: 2 conditional evaluations per prompt and generation, plus 2 shared empty-prompt ones per detector.
    `timesteps` names the first step, where `magnitudes` is read; the cosine's timestep follows from `cosine_step`.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = AnisotropyDetector(pipe, generations=2, cosine_weight=2.0)
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[0].caption])
        >>> round(memorized.score, 2), round(held_out.score, 2), len(memorized.terms)  # terms: each generation's cosine
        (0.95, 0.82, 2)
    """

    name = "anisotropy"
    Config = AnisotropyConfig
    config: AnisotropyConfig
    scores = "the first step and one low-noise step, on pure noise"
    cost = "2 conditional evaluations per prompt and generation"
    paper = "Asthana & Belagiannis, ICLR 2026"
    published = "AUC 0.994 / 0.999, TPR@1% 0.935 / 0.984 (n=1 / 4; Asthana & Belagiannis, ICLR 2026)"
    rank = 20

    def __init__(self, pipe: Any, config: AnisotropyConfig | None = None, **settings: Any) -> None:
        super().__init__(pipe, config, **settings)
        scheduler = self._schedule()
        t_low = float(scheduler.timesteps[self.config.cosine_step])
        if Parameterization.of(scheduler).kind == "flow" and t_low >= scheduler.config.num_train_timesteps:
            raise UnsupportedModelError(
                f"the anisotropy cosine's step ({self.config.cosine_step} of {self.config.num_inference_steps}) is "
                "the first, where a flow model's noise prediction is its input for every prompt (no guidance "
                "direction): give more --num-inference-steps")

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        scheduler = self._schedule()
        param = Parameterization.of(scheduler)
        noise = self._first_input(scheduler)
        t_first, t_low = scheduler.timesteps[0], scheduler.timesteps[self.config.cosine_step]
        pred_c, pred_u, x = self.denoiser.cfg_shared(noise, t_first, cond)
        diff = param.to_score(pred_c, x, t_first) - param.to_score(pred_u, x, t_first)  # flow: the velocity's
        mags = diff.flatten(1).norm(dim=1).reshape(-1, self.config.generations, 1)
        eps_c, eps_u = self._eps_on_noise(noise, t_low, cond, scheduler)
        eps_c, eps_u = self.denoiser.unpacked(eps_c), self.denoiser.unpacked(eps_u)  # channels at dim 1 (Flux)
        cos = torch.nn.functional.cosine_similarity(eps_u, eps_c - eps_u, dim=1).mean(dim=(1, 2))
        return mags, [float(t_first)], cos.reshape(-1, self.config.generations)

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return mags.mean(dim=(1, 2)) + self.config.cosine_weight * terms.mean(dim=1)
