"""MemBench's metric set (Hong et al., TMLR 2025; run_mitigation.py of chunsanHong/MemBench_code) and Webster's
masked measure of template verbatims (ryanwebster90/onestep-extraction, gather_groundtruth_labels.py).

MemBench, per prompt, from the SSCD similarity of each generation to its best-matching training image: the
highest (max SSCD), the mean of the three highest (top-3 SSCD) and the share above 0.5 (SSCD > 0.5); with the
mean CLIP score and aesthetic score of the prompt's generations; each averaged over prompts.
Webster: image, template and mask resized to 256x256 and scaled to [0, 1]; the squared error summed over the mask,
divided by the mask's mean, below 2,500 makes a generation a copy of the template (a template verbatim).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.measures.images import SSCD_COPY_THRESHOLD, ImageLike, to_pil

WEBSTER_SIZE = 256
WEBSTER_TV_THRESHOLD = 2.5e3
"""Masked squared error (over 256x256x3 values in [0, 1]) below which a generation copies a template."""


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def membench_metrics(sims: Sequence[np.ndarray], clip: Sequence[np.ndarray] = (), aesthetic: Sequence[np.ndarray] = (),
                     threshold: float = SSCD_COPY_THRESHOLD) -> dict[str, float | None]:
    """MemBench's columns from per-prompt arrays: `sims[i]` holds each generation's SSCD similarity to prompt i's
    closest training image, `clip[i]` and `aesthetic[i]` each generation's scores (None where not measured)."""
    return {
        "max_sscd": _mean([float(np.max(s)) for s in sims]),
        "top3_sscd": _mean([float(np.sort(s)[-3:].mean()) for s in sims]),
        "sscd_above_half": _mean([float((np.asarray(s) > threshold).mean()) for s in sims]),
        "clip_score": _mean([float(np.mean(c)) for c in clip]),
        "aesthetic_score": _mean([float(np.mean(a)) for a in aesthetic]),
    }


def _webster_array(image: ImageLike | Image.Image) -> np.ndarray:
    """(256, 256, 3) floats in [0, 1], as Webster's pil_img_to_torch reads a resized image (grey repeated to 3
    channels, alpha dropped)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            arr = np.asarray(img.resize((WEBSTER_SIZE, WEBSTER_SIZE)))
    else:
        arr = np.asarray(to_pil(image).resize((WEBSTER_SIZE, WEBSTER_SIZE)))
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    elif arr.shape[2] == 2:
        arr = arr[:, :, :1].repeat(3, axis=2)
    return arr[:, :, :3].astype(np.float32) / 255.0


def masked_error(image: ImageLike, template: ImageLike, mask: ImageLike) -> float:
    """Webster's masked squared error of `image` against a template: sum((t*m - x*m)^2) / mean(m); inf for an
    empty mask."""
    x, t, m = _webster_array(image), _webster_array(template), _webster_array(mask)
    if m.mean() == 0:
        return float("inf")
    return float(((t * m - x * m) ** 2).sum() / m.mean())


def template_copies(images: Sequence[ImageLike], templates: Sequence[tuple[ImageLike, ImageLike]],
                    threshold: float = WEBSTER_TV_THRESHOLD) -> np.ndarray:
    """(G,) whether each image copies any of the (template, mask) pairs by Webster's masked measure."""
    loaded = [(_webster_array(t), _webster_array(m)) for t, m in templates]
    out = np.zeros(len(images), dtype=bool)
    for i, image in enumerate(images):
        x = _webster_array(image)
        out[i] = any(m.mean() > 0 and ((t * m - x * m) ** 2).sum() / m.mean() < threshold for t, m in loaded)
    return out
