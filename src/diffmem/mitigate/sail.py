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
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.config import SamplingConfig, setting
from diffmem.mitigate.base import Calibrating, Mitigation, OptimisationConfig, Outcome, Sampler
from diffmem.models.conditioning import Conditioning, empty, encode
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise
from diffmem.models.families import network
from diffmem.registry import NOT_VERIFIED

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


class FirstStepGuidance:
    """`eps(x, prompt) - eps(x, "")` of initial noises at the first step of a `num_inference_steps` schedule (what
    SAIL and the initial-noise adjustment of Han et al. move the noise by)."""

    def __init__(self, pipe: Any, cond: Conditioning, uncond: Conditioning, num_inference_steps: int = 50) -> None:
        self.pipe = pipe
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


class SailLoss(FirstStepGuidance):
    """The SAIL loss of initial noises for one prompt at the first step of an `num_inference_steps` schedule."""

    def __init__(self, pipe: Any, cond: Conditioning, uncond: Conditioning, weight: float = SAIL_WEIGHT,
                 num_inference_steps: int = 50) -> None:
        super().__init__(pipe, cond, uncond, num_inference_steps)
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Per row: `||delta(x + delta(x) / ||delta(x)||)|| + weight * ||x||`."""
        delta = self.guidance(x)
        unit = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return self.guidance(x + unit).flatten(1).norm(dim=1) + self.weight * x.flatten(1).norm(dim=1)



@dataclass(frozen=True)
class SailConfig(OptimisationConfig):
    """SAIL's options: the loss a noise is accepted at (None: the model's own, else the authors' SD v1.4 value) and
    the weight of `||x_T||`."""

    sail_threshold: float | None = setting(None, option="--sail-threshold", finite=False)
    sail_weight: float = setting(SAIL_WEIGHT, option="--sail-weight", ge=0)

def sail(pipe: Any, prompt: str, *, generations: int = 1, seed: int = 0, threshold: float | None = None,
         iters: int = 10, lr: float = 0.05, weight: float = SAIL_WEIGHT, num_inference_steps: int = 50) -> SailResult:
    """Optimise each generation's initial noise until its SAIL loss is <= `threshold` (see the module docstring);
    the result's noise is what `pipe(prompt, latents=noise)` takes. Gradients reach the noise only.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> prompt = splits.planted[0].caption
        >>> result = sail(pipe, prompt, generations=2, threshold=1.4)  # the authors' 8.2 is SD v1.4's: calibrate it
        >>> result.reached, [round(loss, 1) for loss in result.initial_losses], tuple(result.noise.shape)
        (True, [1.5, 1.6], (2, 4, 8, 8))
        >>> len(pipe(prompt, num_images_per_prompt=2, latents=result.noise, num_inference_steps=10).images)
        2
    """
    SamplingConfig(generations=generations, seed=seed, num_inference_steps=num_inference_steps)  # checked
    config = SailConfig(sail_threshold=threshold, sail_weight=weight, iters=iters, lr=lr)
    threshold = ModelDefaults.of(pipe).resolve_sail_threshold(config.sail_threshold)  # the model's, else the authors'
    with torch.no_grad():
        loss_fn = SailLoss(pipe, encode(pipe, [prompt]), empty(pipe), weight, num_inference_steps)
    start = initial_noise(pipe, generations, seed).to(network(pipe).device, torch.float32)
    return descend_noise(loss_fn, start, threshold=threshold, iters=iters, lr=lr)


def descend_noise(loss_fn: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, threshold: float,
                  iters: int, lr: float, optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
                  ) -> SailResult:
    """Optimise each row of the noises `start` on its own loss (`loss_fn`: one loss per row) until it is <=
    `threshold`, at most `iters` steps: a row is kept as it was when it first reached the threshold, else its last
    iterate (SAIL's loop; Han et al.'s per-sample adjustment with AdamW). Gradients reach the noise only."""
    x = start.clone().requires_grad_(True)
    optimizer = optimizer_class([x], lr=lr)
    chosen = start.clone()
    final = torch.full((start.shape[0],), math.inf, device=start.device)
    done = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
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


class SailMitigation(Mitigation):
    """SAIL: each generation's initial noise optimised (`sail`), then sampled with the unchanged prompt."""

    name = "sail"
    Config = SailConfig
    config: SailConfig
    paper = "Jeon et al., ICML 2025"
    published = NOT_VERIFIED + ": Jeon et al., ICML 2025"
    cost = "at most --iters steps of 2 CFG pairs with gradients over the generations, then a generation"
    rank = 80

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g, c = sampler.generation, self.config
        res = sail(self.pipe, prompt, generations=g.generations, seed=g.seed, threshold=c.sail_threshold,
                   iters=c.iters, lr=c.lr, weight=c.sail_weight, num_inference_steps=g.num_inference_steps)
        images, _ = sampler(noise=res.noise.to(sampler.noise.dtype), prompt=prompt)
        return Outcome(images, sum(res.losses) / len(res.losses), prompt, res.iters, res.reached,
                       {"sail_losses": res.losses, "sail_initial_losses": res.initial_losses})

    calibrated = ("sail_threshold",)

    @classmethod
    def calibrate(cls, context: Calibrating) -> dict[str, Any]:
        """The threshold: the median SAIL loss of the non-memorized prompts' own initial noises."""
        context.log(f"calibration: SAIL loss of {len(context.normal)} non-memorized prompts")
        pipe, g = context.pipe, context.generation
        noise = initial_noise(pipe, g.generations, g.seed).to(network(pipe).device, torch.float32)
        losses: list[float] = []
        with torch.no_grad():
            uncond = empty(pipe)
            for prompt in context.normal:
                loss = SailLoss(pipe, encode(pipe, [prompt]), uncond, num_inference_steps=g.num_inference_steps)
                losses += loss(noise).tolist()
        return {"sail_threshold": statistics.median(losses)}
