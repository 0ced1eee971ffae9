"""SAIL (Jeon et al., ICML 2025): mitigate by choosing the initial noise, not by editing the prompt.

A memorized prompt sits in a sharp peak of the conditional density; SAIL moves the initial noise `x_T` to where the
guidance `delta(x) = eps(x, prompt) - eps(x, "")` (first step) is small even one unit step along itself, while
staying Gaussian-like. Loss per generation, as the authors' proxy (github.com/Dongjae0324/
sharpness_memorization_diffusion, `local_model/pipe.py`): `||delta(x + delta(x)/||delta(x)||)||_2 + weight *
||x||_2`, Adam with lr 0.05, at most 10 steps, and a latent is accepted as soon as its loss is <= `threshold` (the
authors' `l_thres` 8.2 and weight 0.05 for SD v1.4; the loss grows with the latent size: calibrate the threshold per
model, e.g. on non-memorized prompts). Gradients flow through both predictions, as in the authors' code.
Choices: each generation starts from its own initial noise (seed + g), so a generation already below the threshold
keeps its noise and its image is bit-identical to the plain one; the authors instead optimise 8 fresh candidates
and draw new ones (raising the threshold by 0.1 every third failure) until enough are accepted. Here a generation
that never reaches the threshold keeps its last iterate and the result says so (`reached`). Everything is in
epsilon space (the authors' SD2 branch uses another parametrisation and weight 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning, empty, encode
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise

SAIL_WEIGHT = 0.05
"""The authors' weight of `||x||` for Stable Diffusion v1.4."""


@dataclass
class SailResult:
    """The chosen initial noises (generations, C, H, W), each one's final loss, the steps taken, and whether every
    generation reached the threshold."""

    noise: torch.Tensor
    losses: list[float] = field(default_factory=list)
    initial_losses: list[float] = field(default_factory=list)
    iters: int = 0
    reached: bool = False


class SailLoss:
    """The SAIL loss of initial noises for one prompt at the first step of an `num_inference_steps` schedule."""

    def __init__(self, pipe: Any, cond: Conditioning, uncond: Conditioning, weight: float = SAIL_WEIGHT,
                 num_inference_steps: int = 50) -> None:
        self.pipe, self.weight = pipe, weight
        self.denoiser = Denoiser(pipe)
        self.scheduler = self.denoiser.schedule(num_inference_steps)
        self.param = Parameterization.of(self.scheduler)
        self.t = self.scheduler.timesteps[0]
        self.cond, self.uncond = cond, uncond

    def guidance(self, x: torch.Tensor) -> torch.Tensor:
        """`eps(x, prompt) - eps(x, "")` at the first step for unit-variance noises `x` (rows, C, H, W), on
        detection's first-step input (`Denoiser.first_input`); differentiable in `x`."""
        rows = x.shape[0]
        model_in = self.denoiser.first_input(x, self.scheduler)
        eps_c, eps_u = self.denoiser.cfg_epsilon(model_in, self.t, self.cond.expand(rows), self.uncond.expand(rows),
                                                 self.param)
        return eps_c - eps_u

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Per row: `||delta(x + delta(x) / ||delta(x)||)|| + weight * ||x||`."""
        delta = self.guidance(x)
        unit = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return self.guidance(x + unit).flatten(1).norm(dim=1) + self.weight * x.flatten(1).norm(dim=1)


def sail(pipe: Any, prompt: str, *, generations: int = 1, seed: int = 0, threshold: float | None = None,
         iters: int = 10, lr: float = 0.05, weight: float = SAIL_WEIGHT, num_inference_steps: int = 50) -> SailResult:
    """Optimise each generation's initial noise until its SAIL loss is <= `threshold` (see the module docstring);
    the result's noise is what `pipe(prompt, latents=noise)` takes. Gradients reach the noise only."""
    threshold = ModelDefaults.of(pipe).resolve_sail_threshold(threshold)  # the model's, else the authors'
    if math.isnan(threshold):
        raise InputError("--sail-threshold must be a number, not nan")
    if iters < 0 or not (math.isfinite(lr) and lr > 0) or not math.isfinite(weight):
        raise InputError(f"SAIL needs iters >= 0, a positive lr and a finite weight (got {iters}, {lr}, {weight})")
    with torch.no_grad():
        loss_fn = SailLoss(pipe, encode(pipe, [prompt]), empty(pipe), weight, num_inference_steps)
    start = initial_noise(pipe, generations, seed).to(pipe.unet.device, torch.float32)
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    chosen = start.clone()
    final = torch.full((generations,), math.inf, device=start.device)
    done = torch.zeros(generations, dtype=torch.bool, device=start.device)
    initial: list[float] = []
    step = 0
    while True:
        last = step == iters
        with torch.set_grad_enabled(not last):
            losses = loss_fn(x)
        values = losses.detach()
        if not initial:
            initial = values.tolist()
        accept = ~done & (values <= threshold)
        chosen[accept] = x.detach()[accept]
        final[accept] = values[accept]
        done |= accept
        if bool(done.all()) or last:
            break
        (x.grad,) = torch.autograd.grad(losses[~done].sum(), [x])  # the denoiser's parameters get none
        optimizer.step()
        step += 1
    chosen[~done] = x.detach()[~done]  # never accepted: the last iterate
    final[~done] = values[~done]
    return SailResult(chosen.to(start.dtype), final.tolist(), initial, step, bool(done.all()))
