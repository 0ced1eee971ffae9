"""Structural similarity (SSIM) and its multi-scale form (MS-SSIM), as torchmetrics computes them, in a few lines of
torch: a Gaussian window (sigma 1.5), reflect padding then the padded border cropped, constants k1 = 0.01 and
k2 = 0.03, negative terms clipped to 0 ("relu" normalisation), MS-SSIM = prod_j cs_j^beta_j * ssim_last^beta_last
with 2x average pooling between scales. NeMo (Hintersdorf et al., NeurIPS 2024) compares noise residuals with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NEMO_BETAS = (0.33, 0.33, 0.33)
"""The scale weights of NeMo's code (three scales)."""


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """A normalised 2-D Gaussian window of odd side `size`, float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_and_cs(x: torch.Tensor, y: torch.Tensor, kernel: int = 11, sigma: float = 1.5, data_range: float = 1.0,
                k1: float = 0.01, k2: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image pair of (B, C, H, W) batches: mean SSIM and mean contrast-structure term over channels and the
    pixels the window covers whole, in float64."""
    x, y = x.double(), y.double()
    channels, pad = x.shape[1], kernel // 2
    window = gaussian_window(kernel, sigma).to(x.device).expand(channels, 1, kernel, kernel)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(z, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    if pad:
        ssim, cs = ssim[..., pad:-pad, pad:-pad], cs[..., pad:-pad, pad:-pad]
    return ssim.flatten(1).mean(dim=1), cs.flatten(1).mean(dim=1)


def scales_for(side: int, betas: Sequence[float] = NEMO_BETAS, kernel: int = 11) -> tuple[tuple[float, ...], int]:
    """The scale weights and window size MS-SSIM can use on images whose shorter side is `side`.

    As many of `betas` as keep the coarsest scale at least `kernel` pixels wide (at least one), rescaled to the
    total of all of them; if even the finest scale is narrower than `kernel`, the largest odd window that fits.
    Stable Diffusion's 64x64 latents get NeMo's three scales and 11-pixel window unchanged; small models' latents
    (the tiny test pipelines' and the testbed's are 8x8) one scale and a 7-pixel window.
    """
    used = len(betas)
    while used > 1 and side // 2 ** (used - 1) < kernel:
        used -= 1
    weights = tuple(b * sum(betas) / sum(betas[:used]) for b in betas[:used])
    coarsest = side // 2 ** (used - 1)
    size = min(kernel, coarsest if coarsest % 2 else coarsest - 1)
    if size < 1:
        raise ValueError(f"images of side {side} are too small for SSIM")
    return weights, size


def ms_ssim(x: torch.Tensor, y: torch.Tensor, betas: Sequence[float] = NEMO_BETAS, kernel: int = 11,
            data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM of each image pair of (B, C, H, W) batches (float64, shape (B,)); see `scales_for` for
    images too small for every scale."""
    weights, size = scales_for(min(x.shape[-2:]), betas, kernel)
    x, y = x.double(), y.double()
    terms = []
    for j, _ in enumerate(weights):
        sim, cs = ssim_and_cs(x, y, size, data_range=data_range)
        terms.append((sim if j == len(weights) - 1 else cs).clamp_min(0))
        if j < len(weights) - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(terms)
    return (stacked ** torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)[:, None]).prod(dim=0)


def pairwise_ms_ssim(images: torch.Tensor, **kwargs: float) -> torch.Tensor:
    """(n, n) MS-SSIM between every pair of `images` (n, C, H, W); the diagonal is 1."""
    n = images.shape[0]
    out = torch.ones(n, n, dtype=torch.float64, device=images.device)
    if n > 1:
        i, j = torch.triu_indices(n, n, 1)
        sims = ms_ssim(images[i], images[j], **kwargs)  # type: ignore[arg-type]
        out[i, j] = sims
        out[j, i] = sims
    return out
