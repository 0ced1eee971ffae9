"""Jeon et al. (ICML 2025; METHOD.md section 6): the sharpness of the conditional log-density at the first
step."""

from __future__ import annotations

import torch

from diffmem.detectors.base import Detector
from diffmem.models.conditioning import Conditioning
from diffmem.models.denoiser import Parameterization


class SharpnessDetector(Detector):
    """Jeon et al. (ICML 2025): the sharpness of the conditional log-density at the first step,
    `|| H_delta s_delta ||^2` with `s_delta = s(x_T, prompt) - s(x_T, "")` (scores `s = -eps / sigma_t`) and
    `H_delta` its Jacobian in `x`, a Hessian-vector product computed by one forward-mode pass (`torch.func.jvp`).

    A memorized prompt sits in a sharp peak of the density: its guidance direction changes fast along itself.
    On a rectified-flow model (SD3, Flux) the first step is at `s = 1`, where the density is the prompt-free
    Gaussian and `s_delta = -(1 - s) / s (v_c - v_u)` vanishes: the score reads `s_delta`'s leading term, the
    velocity difference `v_u - v_c` (`Parameterization.to_score`), as `MagnitudeDetector` does; the authors'
    quantity is `(1 - s)^4` times it as `s` nears 1.
    Cost: a CFG batch for `s_delta`, then a forward-mode pass of the same batch (about 3x a forward), per prompt and
    generation. Attention runs on PyTorch's math kernel, the one with forward-mode derivatives.
    `magnitudes` holds each generation's `d_T`, which comes for free.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> memorized, held_out = SharpnessDetector(pipe).score([splits.planted[2].caption, splits.heldout[0].caption])
        >>> memorized.score > held_out.score, memorized.terms[0] == memorized.score  # terms: each generation's
        (True, True)
    """

    name = "sharpness"
    cost = "a CFG pair and a forward-mode pass (about 3 forwards) per prompt and generation"
    paper = "Jeon et al., ICML 2025"
    published = "AUC 0.987 / 0.998, TPR@1% 0.908 / 0.982 (n=1 / 4; Jeon et al., ICML 2025)"
    rank = 30

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        scheduler = self._schedule()
        t = scheduler.timesteps[0]
        rows = len(cond) * self.config.generations
        x = self._first_input(scheduler)
        x = x.repeat(len(cond), *(1,) * (x.dim() - 1))  # Flux's packed latents have 3 dimensions
        rows_c, rows_u = cond.repeat_interleave(self.config.generations), self._empty_embedding().expand(rows)
        param = Parameterization.of(scheduler)
        # the score is -eps / sigma_t; flow: the velocity's leading term at s = 1 (see the class docstring)
        sigma = torch.ones(()) if param.kind == "flow" else param.alpha_sigma(t, x.device)[1]

        def score_difference(z: torch.Tensor) -> torch.Tensor:  # differentiable in z (forward mode)
            pred_c, pred_u = self.denoiser.cfg(z, t, rows_c, rows_u)
            return (param.to_score(pred_u, z, t) - param.to_score(pred_c, z, t)) / sigma

        with self.denoiser.forward_mode():
            direction = score_difference(x)
            hvp = torch.func.jvp(score_difference, (x,), (direction,))[1]
        mags = (direction * sigma).flatten(1).norm(dim=1).reshape(-1, self.config.generations, 1)
        sharpness = hvp.flatten(1).pow(2).sum(dim=1).reshape(-1, self.config.generations)
        return mags, [float(t)], sharpness

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.mean(dim=1)
