"""One path to a pipeline's denoiser: its conditional and unconditional predictions at a step, the first-step
input they start from, and conversions between what it predicts and the noise (METHOD.md: every score is in
epsilon space).

`Denoiser(pipe)` is the single place where diffmem calls the denoiser network (today `pipe.unet` with a
`Conditioning`, SD 1.x/2.x and SDXL alike), so detection, explanation and mitigation start from the same `x_T` and
see the same predictions. `Parameterization` reads the prediction type (epsilon, v_prediction, sample) and the
noise tables off a scheduler. A new family plugs in at these two seams: a transformer denoiser (SD3, Flux, PixArt)
in `Denoiser.predict`, flow matching (`x_t = (1 - s) x0 + s eps`, prediction `v = eps - x0`) as one more
`Parameterization` kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffmem.models.conditioning import Conditioning, empty
from diffmem.models.defaults import PREDICTION_TYPES


def initial_noise(pipe: Any, generations: int, seed: int, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """Initial latents `x_T` for generations 0..n-1: generation g uses `torch.Generator().manual_seed(seed + g)`.

    The same noise serves every prompt, so a score depends on neither batch size nor batch composition, and a
    plain `pipe(..., latents=noise[g:g+1])` call reproduces exactly the trajectory that was scored.
    """
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + g)) for g in range(generations)]
    return torch.cat(noise)


def alpha_sigma(
    scheduler: Any, timestep: torch.Tensor | float | int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sqrt(alpha_bar_t)` and `sqrt(1 - alpha_bar_t)` at (possibly fractional) training timesteps.

    A scalar timestep gives scalars; a vector of B timesteps gives tensors of shape (B, 1, 1, 1).
    """
    acp = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    t = torch.as_tensor(timestep, device=device, dtype=torch.float64).reshape(-1)
    t = (t[0] if t.numel() == 1 else t.reshape(-1, 1, 1, 1)).clamp(0, acp.numel() - 1)
    lo = t.floor().long()
    hi = torch.clamp(lo + 1, max=acp.numel() - 1)
    frac = t - lo
    abar = acp[lo] * (1 - frac) + acp[hi] * frac
    return abar.sqrt().float(), (1 - abar).sqrt().float()


@dataclass(frozen=True)
class Parameterization:
    """What a denoiser predicts (`kind`) and, from its scheduler's noise tables, how that output converts to the
    noise `eps` and the clean sample `x0` of its input `x_t = alpha_t x0 + sigma_t eps`.

    `sample` is always the denoiser's (scaled) input, `t` its timestep (a scalar or one per row). Results are
    float32. Build one with `Parameterization.of(scheduler)`.
    """

    kind: str
    scheduler: Any

    def __post_init__(self) -> None:
        if self.kind not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.kind!r}")

    @classmethod
    def of(cls, scheduler: Any) -> Parameterization:
        """The parameterization a scheduler is configured for (`prediction_type`, epsilon when unset)."""
        return cls(scheduler.config.get("prediction_type", "epsilon"), scheduler)

    def alpha_sigma(self, t: torch.Tensor | float | int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_t` and `sigma_t` of the input at `t` (see the module function `alpha_sigma`)."""
        return alpha_sigma(self.scheduler, t, device)

    def to_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The noise prediction implied by `output` for the input `sample`."""
        out = output.float()
        if self.kind == "epsilon":
            return out
        alpha, sigma = self.alpha_sigma(t, out.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return alpha * out + sigma * x
        return (x - alpha * out) / sigma  # sample

    def to_x0(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The clean-sample prediction implied by `output` for the input `sample`."""
        out = output.float()
        if self.kind == "sample":
            return out
        alpha, sigma = self.alpha_sigma(t, out.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return alpha * x - sigma * out
        return (x - sigma * out) / alpha  # epsilon

    def from_epsilon(self, eps: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The output this parameterization gives for the noise prediction `eps` at the input `sample` (the inverse
        of `to_epsilon`)."""
        eps = eps.float()
        if self.kind == "epsilon":
            return eps
        alpha, sigma = self.alpha_sigma(t, eps.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return (eps - sigma * x) / alpha  # alpha * eps - sigma * x0, with alpha^2 + sigma^2 = 1
        return (x - sigma * eps) / alpha  # sample


class Denoiser:
    """A pipeline's denoiser as diffmem calls it: raw predictions (in the model's own parameterization) for
    conditioning rows, classifier-free-guidance pairs, and the first-step input of given noises.

    It holds no schedule: `schedule(n)` gives a fresh scheduler (stepping one mutates it), and conversions read
    the scheduler they are given (`Parameterization.of(scheduler)`). It caches the empty prompt's conditioning and,
    for `cfg_shared`, the empty prompt's predictions on one shared input per timestep.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._empty: Conditioning | None = None
        self._shared_uncond: dict[float, torch.Tensor] = {}

    @property
    def model(self) -> Any:
        """The denoiser network, read from the pipeline at each use (`pipe.unet`)."""
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def empty(self) -> Conditioning:
        """The empty prompt's one-row conditioning by the pipeline's own convention (computed once, no graph)."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = empty(self.pipe)
        return self._empty

    def schedule(self, num_inference_steps: int) -> Any:
        """A fresh copy of the pipeline's scheduler, set to `num_inference_steps` on the denoiser's device."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    def first_input(self, noise: torch.Tensor, scheduler: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser input for unit-variance noises `noise` (rows, C, H, W) at `t` (the schedule's first timestep
        unless given): cast to the denoiser's device and dtype, scaled by `init_noise_sigma` and
        `scale_model_input`, as the pipeline starts from `latents=noise`."""
        t = scheduler.timesteps[0] if t is None else t
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        return scheduler.scale_model_input(latents, t)

    def predict(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw output for input rows `sample` and conditioning rows `cond` (one each) at `t`."""
        return self.model(sample, t, **cond.unet_kwargs(), return_dict=False)[0]

    def _cfg_batch(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and input of one batched call on rows `[uncond; cond]` (diffusers' CFG order)."""
        inputs = torch.cat([sample, sample])
        return self.predict(inputs, t, Conditioning.cat([uncond, cond])), inputs

    def cfg(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning,
            uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pred_c, pred_u)` for input rows `sample` under `cond` and `uncond` (as many rows each), from one batched
        call."""
        pred_u, pred_c = self._cfg_batch(sample, t, cond, uncond)[0].chunk(2)
        return pred_c, pred_u

    def cfg_epsilon(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                    param: Parameterization) -> tuple[torch.Tensor, torch.Tensor]:
        """`(eps_c, eps_u)`: `cfg` converted to epsilon space as one batch, differentiable in `sample` (gradients
        and forward-mode tangents alike)."""
        pred, inputs = self._cfg_batch(sample, t, cond, uncond)
        eps_u, eps_c = param.to_epsilon(pred, inputs, t).chunk(2)
        return eps_c, eps_u

    def shared_uncond(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The empty prompt's output on the shared input `sample` (one row per generation) at `t`, computed once per
        timestep without a graph: pass the same `sample` at every call on this `Denoiser`."""
        key = float(t)
        if key not in self._shared_uncond:
            with torch.no_grad():
                self._shared_uncond[key] = self.predict(sample, t, self.empty().expand(sample.shape[0]))
        return self._shared_uncond[key]

    def cfg_shared(self, sample: torch.Tensor, t: torch.Tensor,
                   cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(pred_c, pred_u, inputs)` for every row of `cond` on each row of the shared input `sample` (rows
        prompt-major: cond row i with sample row g is row `i * len(sample) + g`). Only the conditional rows are
        computed; the empty prompt's come from `shared_uncond`, the same for every prompt on the same noise."""
        tile = (len(cond),) + (1,) * (sample.dim() - 1)
        inputs = sample.repeat(tile)
        pred_c = self.predict(inputs, t, cond.repeat_interleave(sample.shape[0]))
        pred_u = self.shared_uncond(sample, t).repeat(tile)
        return pred_c, pred_u, inputs
