"""The best first-step detection the testbed's data allows, whatever the model: an upper bound, model-free.

At the first step (t = 981, x_t almost pure noise) an ideal denoiser predicts `x0 = E[x0 | caption]`, so
`d_T` is proportional to `||E[x0 | caption] - E[x0]||`. For a perfectly memorized prompt that mean is its one
training latent; for any other prompt it is the mean over renderings of its caption. The AUC of
`||z_item - mu||` (memorized) against `||mean_caption - mu||` (not) therefore bounds first-step detection: it is
high only if the nuisance a caption leaves open carries more energy than captions differ among themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmem.measures.detection import roc_auc
from diffmem.testbed.scenes import BACKGROUNDS, N_CAPTIONS, NAMED_ATTRIBUTES, render_many, scene_from_id


@torch.no_grad()
def oracle_first_step(vae: Any, n_captions: int = 200, renderings: int = 16, seed: int = 0) -> dict[str, Any]:
    """Oracle first-step AUC in the VAE's latent space, and what scaling the nuisance energy would give."""
    rng = np.random.default_rng(seed)
    scenes = [scene_from_id(int(c)) for c in rng.choice(N_CAPTIONS, size=n_captions, replace=False)]
    seeds = rng.choice(2**31 - 1, size=n_captions * renderings, replace=False)
    backgrounds = rng.integers(len(BACKGROUNDS), size=n_captions * renderings)  # what the caption leaves open
    rendered = [s.replace(background=BACKGROUNDS[int(b)])
                for s, b in zip([s for s in scenes for _ in range(renderings)], backgrounds, strict=True)]
    imgs = torch.from_numpy(render_many(rendered, seeds)) * 2 - 1
    z = torch.cat([vae.encode(imgs[i : i + 512].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                   for i in range(0, len(imgs), 512)]) * vae.config.scaling_factor
    z = z.reshape(n_captions, renderings, -1).numpy()
    mu, caption_mean = z.mean(axis=(0, 1)), z.mean(axis=1)
    held = np.linalg.norm(caption_mean - mu, axis=1)  # an ideal model on a caption it did not memorize
    nuisance = np.linalg.norm(z[:, 0] - caption_mean, axis=1)
    memorized = np.linalg.norm(z[:, 0] - mu, axis=1)  # an ideal model that memorized rendering 0
    scaled = {f"x{k:g}": roc_auc(np.sqrt(held**2 + (k * nuisance) ** 2), held) for k in (1.5, 2, 3)}
    by_attr = {}
    for name in ("shape", "texture"):
        values = sorted({getattr(s, name) for s in scenes})
        by_attr[name] = {v: round(float(np.mean([nuisance[i] / held[i] for i, s in enumerate(scenes)
                                                 if getattr(s, name) == v])), 3) for v in values}
    return {
        "oracle_auc": roc_auc(memorized, held),
        "caption_energy_norm_mean": float(held.mean()),
        "caption_energy_norm_std": float(held.std()),
        "nuisance_norm_mean": float(nuisance.mean()),
        "oracle_auc_if_nuisance_norm_scaled": scaled,
        "nuisance_over_caption_by": by_attr,
        "n_captions": n_captions,
        "renderings": renderings,
        "attributes": list(NAMED_ATTRIBUTES),
    }
