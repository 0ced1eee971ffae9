"""Convert any denoiser output to epsilon space, so scores do not depend on the prediction type (METHOD.md)."""

from __future__ import annotations

import torch


def alpha_sigma(
    scheduler, timestep: torch.Tensor | float | int, device: torch.device
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


def to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, timestep, scheduler) -> torch.Tensor:
    """The noise prediction implied by `model_output` for the (scaled) denoiser input `sample`, in float32."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    out = model_output.float()
    if kind == "epsilon":
        return out
    alpha, sigma = alpha_sigma(scheduler, timestep, out.device)
    x = sample.float()
    if kind == "v_prediction":
        return alpha * out + sigma * x
    if kind == "sample":
        return (x - alpha * out) / sigma
    raise ValueError(f"unsupported prediction_type {kind!r}")
