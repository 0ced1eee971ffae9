"""NeMo's memorization signal (Hintersdorf et al., NeurIPS 2024): a memorized prompt's first noise prediction
carries the training image, so its noise residuals look alike across seeds; an ordinary prompt's do not.

As the authors' code (github.com/ml-research/localizing_memorization_in_diffusion_models, `compute_noise_diff`):
the residual of a generation is `eps(x_T, t, prompt) - x_T` on its pure initial noise, conditional prediction only
(their detection runs with guidance 0), min-max scaled to [0, 1] per channel; their loop returns at its second
iteration without stepping the latents, so `t` is the second timestep of the 50-step schedule, on `x_T`
(`TIMESTEP_INDEX`). Residuals are compared by MS-SSIM (window 11, scale weights 0.33 x 3; `diffmem.measures.ssim`),
and a
generation's term is its highest MS-SSIM with another generation of the same prompt (`calculate_max_pairwise_ssim`);
the prompt's score is the highest term, which the authors compare with 0.428 (`NEMO_THRESHOLD`: mean + 1 std over
non-memorized LAION prompts on SD v1.4). Needs at least 2 generations (the authors use 10). v-prediction outputs
are converted to epsilon first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffmem.config import generations_setting, setting
from diffmem.detectors.base import Detector, DetectorConfig
from diffmem.errors import InputError
from diffmem.measures.ssim import pairwise_ms_ssim
from diffmem.models.conditioning import Conditioning
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.registry import NOT_VERIFIED

NEMO_THRESHOLD = 0.428
"""The authors' SSIM threshold for SD v1.4 (mean + 1 std of the pairwise SSIM of non-memorized prompts)."""
TIMESTEP_INDEX = 1
"""Where in the schedule the authors' code evaluates the residual (see the module docstring)."""


def scaled_residuals(eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`eps - noise`, min-max scaled to [0, 1] per row and channel (float32)."""
    diff = (eps.float() - noise.float()).flatten(2)
    lo, hi = diff.amin(dim=2, keepdim=True), diff.amax(dim=2, keepdim=True)
    return ((diff - lo) / (hi - lo).clamp_min(1e-12)).reshape(eps.shape)


def noise_residuals(pipe: Any, cond: Conditioning, noise: torch.Tensor, num_inference_steps: int = 50,
                    timestep_index: int = TIMESTEP_INDEX) -> torch.Tensor:
    """NeMo's scaled residuals of `cond` (one row per noise) on the pure noises `noise` (rows, C, H, W): one
    conditional denoiser call."""
    denoiser = Denoiser(pipe)
    scheduler = denoiser.schedule(num_inference_steps)
    t = scheduler.timesteps[timestep_index]
    model_in = denoiser.first_input(noise, scheduler, t)
    eps = Parameterization.of(scheduler).to_epsilon(denoiser.predict(model_in, t, cond), model_in, t)
    return scaled_residuals(eps, noise.to(denoiser.device, denoiser.dtype))


def max_pairwise_ssim(residuals: torch.Tensor) -> torch.Tensor:
    """Per residual (n, C, H, W), its highest MS-SSIM with another one (float64, (n,))."""
    sims = pairwise_ms_ssim(residuals)
    sims.fill_diagonal_(-1.0)
    return sims.amax(dim=1)


@dataclass(frozen=True)
class NemoConfig(DetectorConfig):
    """NeMo's settings: the authors' 10 seeds and the schedule step of the residual."""

    generations: int = generations_setting(10, 2, "nemo compares the noise residuals of a prompt's generations")
    timestep_index: int = setting(TIMESTEP_INDEX, option="timestep_index", ge=0)

    def check(self) -> None:
        super().check()
        if self.timestep_index >= self.num_inference_steps:
            raise InputError(f"timestep_index {self.timestep_index} is outside a schedule of "
                             f"{self.num_inference_steps} steps")


class NemoDetector(Detector):
    """NeMo's detection score: the highest MS-SSIM between the noise residuals of a prompt's generations.

    `terms` holds each generation's highest MS-SSIM, `magnitudes` its `d_t` at the residual's timestep (free).

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = NemoDetector(pipe, generations=2)  # the fewest it compares (the authors take 10)
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[2].caption])
        >>> round(memorized.score, 2), round(held_out.score, 2), len(memorized.terms)
        (0.94, 0.51, 2)
    """

    name = "nemo"
    reads_unet_attention = True
    Config = NemoConfig
    config: NemoConfig
    scores = "the second step, on pure noise"
    cost = "a CFG pair per prompt and generation, plus pairwise MS-SSIM"
    paper = "Hintersdorf et al., NeurIPS 2024, arXiv 2406.02366"
    published = NOT_VERIFIED + ": Hintersdorf et al., NeurIPS 2024, arXiv 2406.02366 (threshold 0.428 on SD v1.4)"
    rank = 70

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        scheduler = self._schedule()
        t = scheduler.timesteps[self.config.timestep_index]
        latents = self._initial_noise().to(self.pipe.unet.device, self.pipe.unet.dtype)
        model_in = self.denoiser.first_input(latents, scheduler, t)
        eps_c, eps_u = self._eps_on_noise(model_in, t, cond, scheduler)
        mags = (eps_c - eps_u).flatten(1).norm(dim=1).reshape(-1, self.config.generations, 1)
        residuals = scaled_residuals(eps_c, latents.repeat(len(cond), 1, 1, 1))
        terms = torch.stack([max_pairwise_ssim(group)
                             for group in residuals.reshape(-1, self.config.generations, *residuals.shape[1:])])
        return mags, [float(t)], terms

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.amax(dim=1)
