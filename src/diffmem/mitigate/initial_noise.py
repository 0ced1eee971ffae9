"""Han et al. (NeurIPS 2025): adjust the initial noise so the trajectory leaves the attraction basin early, and
guidance can start early.

As the authors' `local_sd_pipeline.py` (github.com/hygnhan/init_noise_diffusion_memorization), with
`e(x) = eps(x, prompt) - eps(x, "")` at the first timestep:

- batch-wise (`--variant batch`, their `--rho 50 --gamma 0.7 --adj_iters 2 --apply_cfg_step 4`): `adj_iters`
  times, `x' = x + rho e(x)/||e(x)||` (per generation) and `x <- x - gamma (e(x') - e(x))`, a step down the
  sharpness of `||e||`; then sampling with the unconditional prediction alone for steps 0..`apply_cfg_step` and the
  full guidance after (through `ScheduledGuidance`, no extra cost);
- per-sample (`--variant sample`, their `--per_sample --target_loss 0.9 --lr 0.01`, 1000 steps): AdamW on each
  generation's noise minimising `||e(x)||` until it is <= the target, then ordinary CFG from step 0.

Choices: the noise is the unit-variance `x_T` on detection's first-step input (`Denoiser.first_input`; the authors
step the latents, the same for SD's DDIM and DPM schedulers, whose initial sigma is 1) and `e` is in epsilon space.
`rho` is a distance in latent space: left out, it is the authors' 50 at SD v1.4's latent size (4x64x64) scaled by
`sqrt(latent size / 16384)`, the same fraction of `||x_T||` on every model. The per-sample target is the model's
target loss (`ModelDefaults.target_loss`; the authors' 0.9 is SD v1.4's scale, as Wen et al.'s 3.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.config import MAX_STEPS, setting
from diffmem.mitigate.base import MAX_ITERS, Mitigation, NoOptions, Outcome, Sampler
from diffmem.mitigate.guidance import ScheduledGuidance
from diffmem.mitigate.sail import FirstStepGuidance, descend_noise
from diffmem.models.conditioning import encode
from diffmem.models.defaults import ModelDefaults
from diffmem.registry import NOT_VERIFIED

HAN_RHO = 50.0
"""The authors' perturbation radius, for SD v1.4's latents."""
SD14_LATENT_SIZE = 4 * 64 * 64
"""The number of entries of SD v1.4's latent, the size `HAN_RHO` is for."""
VARIANTS = ("batch", "sample")


@dataclass(frozen=True)
class InitialNoiseConfig(NoOptions):
    """Han et al.'s options: the variant, the batch-wise step (radius, step size, repeats, unguided steps) and the
    per-sample optimisation (target: None for the model's own target loss; steps; learning rate)."""

    variant: str = setting("batch", option="--variant", choices=VARIANTS)
    rho: float | None = setting(None, option="--rho", gt=0, le=1e4, says="above 0 and at most 10000 (a distance "
                                "in latent space), or left out")
    gamma: float = setting(0.7, option="--gamma", gt=0, le=10)
    adj_iters: int = setting(2, option="--adj-iters", ge=0, le=100)
    apply_cfg_step: int = setting(4, option="--apply-cfg-step", ge=-1, le=MAX_STEPS)
    target_loss: float | None = setting(None, option="--target-loss", finite=False)
    noise_iters: int = setting(1000, option="--noise-iters", ge=0, le=MAX_ITERS)
    noise_lr: float = setting(0.01, option="--noise-lr", gt=0, says="a positive number")

    def resolved(self, defaults: ModelDefaults) -> InitialNoiseConfig:
        return self.replace(target_loss=defaults.resolve_target_loss(self.target_loss))


def scaled_rho(rho: float | None, noise: torch.Tensor) -> float:
    """`rho`, or the authors' radius scaled from SD v1.4's latent size to that of `noise` (rows, ...)."""
    return rho if rho is not None else HAN_RHO * math.sqrt(noise[0].numel() / SD14_LATENT_SIZE)


def adjust_batch(guide: FirstStepGuidance, noise: torch.Tensor, rho: float, gamma: float,
                 adj_iters: int) -> torch.Tensor:
    """The batch-wise adjustment of unit-variance noises (rows, C, H, W): `adj_iters` times
    `x <- x - gamma (e(x + rho e/||e||) - e(x))`."""
    x = noise.float()
    with torch.no_grad():
        for _ in range(adj_iters):
            e = guide.guidance(x)
            unit = e / e.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *(1,) * (e.dim() - 1))
            x = x - gamma * (guide.guidance(x + rho * unit) - e)
    return x


class InitialNoise(Mitigation):
    """The initial noise adjusted (batch-wise or per sample), then the prompt sampled from it."""

    name = "initial-noise"
    Config = InitialNoiseConfig
    config: InitialNoiseConfig
    paper = "Han et al., NeurIPS 2025"
    published = NOT_VERIFIED + ": Han et al., NeurIPS 2025"
    cost = ("batch: 2 CFG pairs per --adj-iters, then a generation; sample: at most --noise-iters CFG pairs with "
            "gradients, then a generation")
    rank = 100

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g, c = sampler.generation, self.config
        with torch.no_grad():
            guide = FirstStepGuidance(self.pipe, encode(self.pipe, [prompt]), sampler.uncond, g.num_inference_steps)
        if c.variant == "sample":
            assert c.target_loss is not None  # resolved
            res = descend_noise(lambda x: guide.guidance(x).flatten(1).norm(dim=1), sampler.noise.float(),
                                threshold=c.target_loss, iters=c.noise_iters, lr=c.noise_lr,
                                optimizer_class=torch.optim.AdamW)
            images, final = sampler(noise=res.noise.to(sampler.noise.dtype), prompt=prompt)
            return Outcome(images, final, prompt, res.iters, res.reached,
                           {"initial_losses": res.initial_losses, "noise_losses": res.losses})
        noise = adjust_batch(guide, sampler.noise, scaled_rho(c.rho, sampler.noise), c.gamma, c.adj_iters)
        after = guide.scheduler.timesteps[c.apply_cfg_step + 1:]  # guidance from step apply_cfg_step + 1 on
        boundary = float(after[0]) if len(after) else -1.0
        assert g.guidance_scale is not None  # resolved
        with ScheduledGuidance(self.pipe, g.guidance_scale, 0.0, boundary) as edit:
            images, _ = sampler(noise=noise.to(sampler.noise.dtype), prompt=prompt)
        return Outcome(images, edit.first_score, prompt, c.adj_iters, None,
                       {"guidance_from_step": edit.switched_at})
