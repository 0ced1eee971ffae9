"""Copy similarity for testbed images: does a generated image reproduce one particular training rendering?

The measure is a normalised correlation after a light gaussian pre-blur (sigma 1 px) and per-channel mean
removal. The pre-blur makes it insensitive to what a VAE round trip or a diffusion sampler loses (pixel noise,
the finest detail), while object placement, texture phase/orientation and lighting, the nuisance that differs
between two renderings of one caption, survive it; removing each channel's mean discards the background
colour that every rendering of a caption shares. ``COPY_THRESHOLD`` sits well above what two renderings of
the same caption reach and well below what a rendering reaches against a degraded copy of itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffmem.testbed.scenes import IMAGE_SIZE, render_many, sample_scene

#: Pre-blur (px) applied by ``copy_features`` before correlating.
PRE_BLUR_SIGMA: float = 1.0

#: A generated image whose copy_similarity to a training image exceeds this is a copy of it. Justified
#: model-free in DATA.md: same-caption renderings reach 0.91 at the 99.9th percentile, a rendering against
#: itself after blur sigma 0.7 px + noise sigma 0.02 stays above 0.985.
COPY_THRESHOLD: float = 0.95


def _blur_matrices(sigma: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size) row-stochastic gaussian blur matrices, reflected borders; sigma 0 gives identity."""
    pos = np.arange(size, dtype=np.float64)
    # reflect about the borders (half-sample symmetric), enough copies for sigma up to ~size/3
    mirrored = np.concatenate([-1 - pos[::-1], pos, 2 * size - 1 - pos[::-1]])
    targets = np.concatenate([pos[::-1], pos, pos[::-1]]).astype(int)
    s = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6)[:, None, None]
    w = np.exp(-0.5 * ((pos[None, :, None] - mirrored[None, None, :]) / s) ** 2)
    mats = np.zeros((len(s), size, size))
    for j in range(size):
        mats[:, :, j] = w[:, :, targets == j].sum(axis=2)
    mats /= mats.sum(axis=2, keepdims=True)
    mats[mats < 1e-9] = 0.0  # truncate the tails: float32 denormals would make the products ~100x slower
    return mats.astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Gaussian blur of square (N, C, S, S) images, one sigma (px) or one per image, reflected borders."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images (N, C, S, S), got {images.shape}")
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(images),))
    uniq, inverse = np.unique(sig, return_inverse=True)
    mats = _blur_matrices(uniq, images.shape[-1])
    out = np.empty_like(images)
    for start in range(0, len(images), 1024):  # chunks keep temporaries small (no fresh mmap per call)
        part = slice(start, start + 1024)
        mat = mats[0] if len(uniq) == 1 else mats[inverse[part]][:, None]
        out[part] = mat @ images[part] @ mat.swapaxes(-1, -2)
    return out


def degrade(
    images: np.ndarray, blur_sigma: float = 0.7, noise_sigma: float = 0.02, seed: int = 0
) -> np.ndarray:
    """Mild degradation (gaussian blur, gaussian pixel noise, clip): a stand-in for an imperfect copy."""
    rng = np.random.default_rng(seed)
    noisy = gaussian_blur(images, blur_sigma) + noise_sigma * rng.standard_normal(
        images.shape, dtype=np.float32
    )
    return np.clip(noisy, 0.0, 1.0)


def copy_features(images: np.ndarray) -> np.ndarray:
    """(N, 3*H*W) unit vectors whose dot products are ``copy_similarity``: pre-blur, per-channel centring."""
    x = gaussian_blur(images, PRE_BLUR_SIGMA)
    x = (x - x.mean(axis=(2, 3), keepdims=True)).reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # a featureless (flat) image gets the zero vector: similarity 0 to everything, not rounding noise
    return np.where(norm > 1e-4, x / np.maximum(norm, 1e-4), 0.0).astype(np.float32)


def copy_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) copy similarity in [-1, 1] between images a (N, 3, H, W) and b (M, 3, H, W) in [0, 1]."""
    return copy_features(a) @ copy_features(b).T


def own_similarity(generated: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(N, G) copy similarity of each prompt's G generations (N, G, 3, H, W) to its own training image (N, 3, H, W)."""
    return np.stack([copy_similarity(generated[k], own[k : k + 1])[:, 0] for k in range(len(own))])


def nearest_training(
    images: np.ndarray, train_images: np.ndarray, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """For each image, the index of its most copy-similar training image and that similarity (chunked)."""
    query = copy_features(images)
    best_idx = np.zeros(len(query), dtype=np.int64)
    best_sim = np.full(len(query), -np.inf, dtype=np.float32)
    for start in range(0, len(train_images), chunk):
        sims = query @ copy_features(train_images[start : start + chunk]).T
        arg = sims.argmax(axis=1)
        top = sims[np.arange(len(query)), arg]
        better = top > best_sim
        best_idx[better], best_sim[better] = arg[better] + start, top[better]
    return best_idx, best_sim


def same_caption_similarity(
    n: int = 2000, seed: int = 0, roundtrip: Callable[[np.ndarray], np.ndarray] | None = None,
    same_background: bool = False,
) -> np.ndarray:
    """Similarities of n pairs of renderings of one random caption with two different nuisance seeds.

    This is what a model that learned the caption but copied nothing would reach; ``roundtrip`` (images ->
    images, e.g. a VAE encode/decode) is applied to both renderings of each pair when given. Each rendering
    draws its own background colour, as the caption leaves it open, unless ``same_background`` (the harder case:
    a generation that happens to pick its training image's background).
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    others = scenes if same_background else [s.replace(background=sample_scene(rng).background) for s in scenes]
    seeds = rng.choice(2**31 - 1, size=2 * n, replace=False)
    a, b = render_many(scenes, seeds[:n]), render_many(others, seeds[n:])
    if roundtrip is not None:
        a, b = roundtrip(a), roundtrip(b)
    return np.einsum("nd,nd->n", copy_features(a), copy_features(b))


def degraded_self_similarity(
    n: int = 2000, seed: int = 0, blur_sigma: float = 0.7, noise_sigma: float = 0.02
) -> np.ndarray:
    """Similarities of n random renderings to a ``degrade``-d copy of themselves: what a real copy reaches."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = render_many(scenes, rng.choice(2**31 - 1, size=n, replace=False))
    copies = degrade(images, blur_sigma, noise_sigma, seed=seed + 1)
    return np.einsum("nd,nd->n", copy_features(images), copy_features(copies))


def threshold_report(n: int = 20000, seed: int = 0) -> dict[str, object]:
    """The model-free numbers behind ``COPY_THRESHOLD``: same-caption and degraded-self quantiles."""
    quantiles = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)

    def summary(sims: np.ndarray) -> dict[str, float]:
        return {f"q{q:g}": round(float(np.quantile(sims, q)), 4) for q in quantiles}

    same = same_caption_similarity(n, seed)
    same_bg = same_caption_similarity(n, seed + 3, same_background=True)
    return {
        "threshold": COPY_THRESHOLD,
        "same_caption": summary(same),
        "same_caption_above_threshold": float((same > COPY_THRESHOLD).mean()),
        "same_caption_and_background": summary(same_bg),
        "same_caption_and_background_above_threshold": float((same_bg > COPY_THRESHOLD).mean()),
        "degraded_self_blur0.7_noise0.02": summary(degraded_self_similarity(n, seed + 1)),
        "degraded_self_blur1.0_noise0.03": summary(degraded_self_similarity(n, seed + 2, 1.0, 0.03)),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(threshold_report(), indent=2))
