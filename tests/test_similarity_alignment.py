"""Testbed instruments: copy similarity and its model-free threshold; the classifier behind aligned()."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from diffmem.testbed.alignment import (
    ALIGNED_ATTRIBUTES,
    WEIGHTS_PATH,
    AttributeClassifier,
    aligned,
    attribute_accuracy,
    load_alignment_classifier,
    predict_attributes,
)
from diffmem.testbed.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    NAMED_ATTRIBUTES,
    VOCABULARY,
    Scene,
    render_many,
    sample_scene,
)
from diffmem.testbed.similarity import (
    COPY_THRESHOLD,
    copy_similarity,
    degrade,
    degraded_self_similarity,
    gaussian_blur,
    nearest_training,
    same_caption_similarity,
)


@pytest.fixture(scope="module")
def fresh() -> tuple[list[Scene], np.ndarray]:
    """Renderings the classifier never saw (its training pool is drawn from another seed stream)."""
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng) for _ in range(600)]
    return scenes, render_many(scenes, rng.integers(2**31 - 1, size=600) + 7)


def test_gaussian_blur_matches_scipy_and_per_image_sigma() -> None:
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    for sigma in (0.0, 0.7, 1.5):
        expected = gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=8) if sigma else x
        np.testing.assert_allclose(gaussian_blur(x, sigma), expected, atol=1e-5)
    sigmas = np.array([0.3, 1.0, 0.0, 1.0])
    per_image = gaussian_blur(x, sigmas)
    for i, s in enumerate(sigmas):
        np.testing.assert_allclose(per_image[i], gaussian_blur(x[i : i + 1], s)[0], atol=1e-6)


def test_copy_similarity_basic_properties(fresh: tuple[list[Scene], np.ndarray]) -> None:
    _, images = fresh
    a, b = images[:5], images[5:12]
    sim = copy_similarity(a, b)
    assert sim.shape == (5, 7)
    np.testing.assert_allclose(sim, copy_similarity(b, a).T, atol=1e-5)
    np.testing.assert_allclose(np.diag(copy_similarity(a, a)), 1.0, atol=1e-5)
    assert np.all(np.abs(sim) <= 1.0 + 1e-5)
    # invariant to a global brightness offset/gain per channel (background colour jitter is not identity)
    np.testing.assert_allclose(copy_similarity(a, a * 0.9 + 0.05).diagonal(), 1.0, atol=1e-5)


def test_threshold_separates_same_caption_from_degraded_copies() -> None:
    same = same_caption_similarity(n=1500, seed=1)
    copies = degraded_self_similarity(n=500, seed=2)
    assert np.quantile(same, 0.99) < COPY_THRESHOLD - 0.1
    assert np.quantile(same, 0.999) < COPY_THRESHOLD - 0.02
    assert (same > COPY_THRESHOLD).mean() <= 0.002
    assert copies.min() > COPY_THRESHOLD + 0.02
    assert np.median(same) < 0.5  # the caption alone does not fix the picture


def test_same_caption_similarity_applies_roundtrip() -> None:
    calls: list[tuple[int, ...]] = []

    def roundtrip(images: np.ndarray) -> np.ndarray:
        calls.append(images.shape)
        return np.zeros_like(images) + images.mean(axis=(2, 3), keepdims=True)  # flat: no structure left

    plain = same_caption_similarity(n=50, seed=3)
    sims = same_caption_similarity(n=50, seed=3, roundtrip=roundtrip)
    assert calls == [(50, 3, 32, 32), (50, 3, 32, 32)]
    assert np.all(np.abs(sims) < 1e-3) and not np.allclose(plain, sims)
    np.testing.assert_array_equal(plain, same_caption_similarity(n=50, seed=3))


def test_nearest_training_finds_the_copied_rendering(fresh: tuple[list[Scene], np.ndarray]) -> None:
    scenes, train = fresh
    # distractors: other renderings of exactly the captions being copied
    twins = render_many(scenes[:20], np.arange(20) + 10**6)
    train = np.concatenate([train, twins])
    queries = degrade(train[:20], seed=5)
    idx, sim = nearest_training(queries, train, chunk=128)
    np.testing.assert_array_equal(idx, np.arange(20))
    assert np.all(sim > COPY_THRESHOLD)
    idx_twin, sim_twin = nearest_training(twins, train[:600])
    assert np.all(sim_twin < COPY_THRESHOLD)  # a re-rendering of a training caption is not a copy
    full = copy_similarity(queries, train)
    np.testing.assert_allclose(sim, full.max(axis=1), atol=1e-5)


def test_shipped_classifier_is_small() -> None:
    assert WEIGHTS_PATH.exists() and WEIGHTS_PATH.stat().st_size < 1_000_000
    model = load_alignment_classifier()
    assert isinstance(model, AttributeClassifier) and not model.training
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_classifier_reads_fresh_renders(fresh: tuple[list[Scene], np.ndarray]) -> None:
    scenes, images = fresh
    for name, imgs in (("clean", images), ("degraded", degrade(images, 0.7, 0.02, seed=1))):
        acc = attribute_accuracy(imgs, scenes)
        assert set(acc) == set(ATTRIBUTES)
        for attr in ALIGNED_ATTRIBUTES:
            assert acc[attr] >= 0.97, (name, attr, acc)
        assert acc["background"] >= 0.95, (name, acc)
        assert aligned(imgs, scenes).mean() >= 0.95, name
        # a caption leaves the background open: scenes without one are judged on what they name
        assert set(attribute_accuracy(imgs, [s.replace(background=None) for s in scenes])) == set(NAMED_ATTRIBUTES)
        assert aligned(imgs, [s.replace(background=None) for s in scenes]).mean() >= 0.95, name


def test_aligned_rejects_wrong_captions(fresh: tuple[list[Scene], np.ndarray]) -> None:
    scenes, images = fresh
    scenes, images = scenes[:200], images[:200]
    predicted = predict_attributes(images)
    assert all(p[a] in VOCABULARY[a] for p in predicted for a in ATTRIBUTES)
    for attr in ALIGNED_ATTRIBUTES:
        vocab = VOCABULARY[attr]
        wrong = [s.replace(**{attr: vocab[(vocab.index(getattr(s, attr)) + 1) % len(vocab)]}) for s in scenes]
        assert aligned(images, wrong).mean() < 0.05, attr
    # the background colour is read but not required: captions leave it open
    other_background = [s.replace(background=BACKGROUNDS[(BACKGROUNDS.index(s.background) + 1) % 6]) for s in scenes]
    assert aligned(images, other_background).mean() > 0.9
    assert COLORS[0] in {p["color"] for p in predicted}
    with pytest.raises(ValueError):
        aligned(images, scenes[:-1])
