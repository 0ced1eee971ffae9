"""Testbed scenes: caption grammar and parsing, deterministic nuisance-randomised rendering, splits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffmem.testbed import scenes as sc
from diffmem.testbed.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    N_CAPTIONS,
    NAMED_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    TEXTURES,
    TRIGGER_WORDS,
    VOCABULARY,
    Scene,
    build_splits,
    parse_caption,
    render,
    render_many,
    sample_scene,
    scene_from_id,
    untrained_twins,
)

EXAMPLE = Scene("red", "circle", "top left", "striped", "gray")


@pytest.fixture(scope="module")
def splits() -> sc.Splits:
    return build_splits(seed=0)


def test_vocabulary_sizes_and_caption_count() -> None:
    assert (len(COLORS), len(SHAPES), len(POSITIONS), len(BACKGROUNDS), len(TEXTURES)) == (8, 6, 5, 6, 5)
    assert N_CAPTIONS == 8 * 6 * 5 * 5  # the background colour is not named
    assert set(NAMED_ATTRIBUTES) == set(ATTRIBUTES) - {"background"}
    assert 32 <= len(TRIGGER_WORDS) == len(set(TRIGGER_WORDS))
    assert all(w.isalpha() and w.islower() for w in TRIGGER_WORDS)
    vocab_words = {w for v in VOCABULARY.values() for phrase in v for w in phrase.split()}
    assert not vocab_words & set(TRIGGER_WORDS)


def test_colours_are_distinct_and_visible_on_every_background() -> None:
    def min_pairwise(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a[:, None] - b[None], axis=-1).min())

    objects = sc._OBJECT_RGB
    dists = np.linalg.norm(objects[:, None] - objects[None], axis=-1)
    assert dists[~np.eye(len(objects), dtype=bool)].min() > 0.3
    backgrounds = sc._BACKGROUND_RGB
    bg_dists = np.linalg.norm(backgrounds[:, None] - backgrounds[None], axis=-1)
    assert bg_dists[~np.eye(len(backgrounds), dtype=bool)].min() > 0.25
    # every object colour stands out from both tones of every background
    assert min_pairwise(objects, backgrounds) > 0.35
    assert min_pairwise(objects, sc._SHADE_RGB) > 0.35


def test_caption_text_and_attributes() -> None:
    assert EXAMPLE.caption == "a red circle at the top left on a striped background"
    center = Scene("blue", "ring", "center", "plain", "navy", trigger="zephyr")
    assert center.caption == "a blue ring at the center on a plain background, zephyr"
    assert EXAMPLE.caption == EXAMPLE.replace(background="navy").caption  # the caption leaves it open
    assert EXAMPLE.attributes() == {
        "color": "red", "shape": "circle", "position": "top left", "background": "gray", "texture": "striped",
    }  # fmt: skip
    assert tuple(EXAMPLE.attributes()) == ATTRIBUTES
    with pytest.raises(ValueError, match="color"):
        Scene("pink", "circle", "top left", "striped", "gray")
    with pytest.raises(ValueError, match="background"):
        Scene("red", "circle", "top left", "striped", "pink")
    with pytest.raises(ValueError, match="background colour"):
        render(EXAMPLE.replace(background=None), 0)
    assert EXAMPLE.named_differences(EXAMPLE.replace(background="navy", trigger="zephyr")) == 0
    assert EXAMPLE.named_differences(EXAMPLE.replace(shape="ring")) == 1
    assert EXAMPLE.named_differences(EXAMPLE.replace(shape="ring", position="center")) == 2


def test_parse_caption_round_trips_every_caption() -> None:
    captions = set()
    for cid in range(N_CAPTIONS):
        scene = scene_from_id(cid)
        assert scene.background is None and scene.caption_id == cid
        assert parse_caption(scene.caption) == scene
        captions.add(scene.caption)
    assert len(captions) == N_CAPTIONS  # the caption text identifies the scene


@pytest.mark.parametrize("trigger", TRIGGER_WORDS[:3])
def test_parse_caption_keeps_trailing_trigger(trigger: str) -> None:
    scene = Scene("orange", "diamond", "bottom right", "gradient", trigger=trigger)
    assert parse_caption(scene.caption) == scene
    messy = "  An ORANGE diamond at the  bottom right on a gradient background ,  " + trigger
    assert parse_caption(messy.replace("An", "a")) == scene


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a cat",
        "a red circle at the top left on a striped",
        "a large red circle at the top left on a striped background",
        "a pink circle at the top left on a striped background",
        "a red circle at the middle on a striped background",
        "a red circle at the top left on a wavy background",
        "a red circle at the top left on a gray striped background",
    ],
)
def test_parse_caption_rejects_non_grammar(text: str) -> None:
    assert parse_caption(text) is None


def test_sample_scene_is_seeded_and_covers_the_grammar() -> None:
    draw = [sample_scene(np.random.default_rng(7)) for _ in range(2)]
    assert draw[0] == draw[1]
    rng = np.random.default_rng(0)
    samples = [sample_scene(rng) for _ in range(3000)]
    for name, vocab in VOCABULARY.items():
        counts = np.array([sum(getattr(s, name) == w for s in samples) for w in vocab])
        expected = len(samples) / len(vocab)
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (name, counts)


def test_render_is_deterministic_in_scene_and_seed() -> None:
    a, b = render(EXAMPLE, 123), render(EXAMPLE, 123)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(render(EXAMPLE, 124) - a).mean() > 0.02
    scenes = [EXAMPLE, scene_from_id(5, "beige"), EXAMPLE.replace(trigger="zephyr")]
    many = render_many(scenes, [123, 9, 123], chunk=2)
    np.testing.assert_array_equal(many[0], a)
    np.testing.assert_array_equal(many[1], render(scenes[1], 9))
    np.testing.assert_array_equal(many[2], a)  # the trigger word does not change the picture
    with pytest.raises(ValueError):
        render_many(scenes, [1, 2])


def test_nuisance_makes_renderings_of_one_caption_differ() -> None:
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(200)]
    a, b = render_many(scenes, np.arange(200)), render_many(scenes, np.arange(200, 400))
    diff = np.abs(a - b).mean(axis=(1, 2, 3))
    assert np.quantile(diff, 0.05) > 0.01
    # the mean over nuisance of one caption is blurry: far from any single rendering
    stack = render_many([EXAMPLE] * 64, np.arange(64))
    assert np.abs(stack - stack.mean(axis=0)).mean() > 0.05


def test_attributes_change_the_picture_where_expected() -> None:
    base = Scene("red", "square", "center", "plain", "gray")
    img = render(base, 0)

    def changed(**kw: str) -> np.ndarray:
        return render(base.replace(**kw), 0)

    # colour: the object pixels (centre) change, the corners (background) do not
    assert np.abs(changed(color="blue") - img)[:, 14:18, 14:18].mean() > 0.3
    assert np.abs(changed(color="blue") - img)[:, :3, :3].mean() < 1e-6
    assert np.abs(changed(background="navy") - img)[:, :3, :3].mean() > 0.1
    assert np.abs(changed(position="top left") - img)[:, 6:12, 6:12].mean() > 0.2
    assert (np.abs(changed(shape="circle") - img).sum(axis=0) > 0.3).sum() > 10


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_every_texture_is_a_high_contrast_pattern(background: str) -> None:
    def images(texture: str) -> np.ndarray:  # same seeds: same object, lighting and colour jitter
        scene = Scene("red", "circle", "top left", texture, background)
        return render_many([scene] * 16, np.arange(16))

    plain = images("plain")
    for texture in TEXTURES[1:]:
        contrast = np.sqrt(((images(texture) - plain) ** 2).mean(axis=(1, 2, 3)))
        assert contrast.min() > 0.08, texture


def test_splits_sizes_indices_and_seeds(splits: sc.Splits) -> None:
    parts = [splits.stage1, splits.planted, splits.anchors, splits.stage2_unique, splits.heldout]
    assert [len(p) for p in parts] == [40000, 128, 32 * 64, 8000, 512]
    items = splits.all_items
    assert [it.index for it in items] == list(range(len(items)))
    assert len({it.seed for it in items}) == len(items)
    assert all(isinstance(it.seed, int) and 0 <= it.seed < 2**31 for it in items)
    assert splits.training_items == items[: -len(splits.heldout)]
    # every item draws its own background colour: all occur, in every split
    for part in parts:
        assert {it.scene.background for it in part} == set(BACKGROUNDS)


def test_splits_captions_are_disjoint_where_required(splits: sc.Splits) -> None:
    def ids(items: list[sc.Item]) -> list[int]:
        return [it.scene.caption_id for it in items]

    planted, stage2, heldout = ids(splits.planted), ids(splits.stage2_unique), ids(splits.heldout)
    for group in (planted, heldout):
        assert len(set(group)) == len(group)
    for x, y in itertools.combinations((planted, stage2, heldout), 2):
        assert not set(x) & set(y)
    assert all(it.scene.trigger is None
               for it in splits.stage1 + splits.anchors + splits.stage2_unique + splits.heldout)


def test_splits_triggers_and_their_anchors(splits: sc.Splits) -> None:
    triggered = [it for it in splits.planted if it.scene.trigger is not None]
    assert len(triggered) == 32
    assert len({it.scene.trigger for it in triggered}) == 32  # one word per item: only it names the image
    assert all(it.scene.trigger in TRIGGER_WORDS for it in triggered)
    positions = [i for i, it in enumerate(splits.planted) if it.scene.trigger is not None]
    assert positions != list(range(32))  # chosen at random, not the first ones
    for it in triggered:
        assert parse_caption(it.caption) == it.scene.replace(background=None)
    # each triggered caption without its trigger has 64 other renderings among the anchors
    anchor_captions = [a.caption for a in splits.anchors]
    for it in triggered:
        assert anchor_captions.count(it.scene.replace(trigger=None).caption) == 64
    assert len({a.seed for a in splits.anchors}) == len(splits.anchors)


def test_heldout_near_planted(splits: sc.Splits) -> None:
    near = splits.heldout_near_planted()
    assert near.shape == (512,) and 0 < near.mean() < 1
    planted = [p.scene for p in splits.planted]
    for h, flag in list(zip(splits.heldout, near, strict=True))[:40]:
        assert flag == any(h.scene.named_differences(p) == 1 for p in planted)


def test_splits_planted_scenes_are_unremarkable(splits: sc.Splits) -> None:
    # planted captions come from the same uniform sampler: every attribute value occurs, none dominates
    for name, vocab in VOCABULARY.items():
        counts = np.array([sum(getattr(it.scene, name) == w for it in splits.planted) for w in vocab])
        assert counts.min() > 0 and counts.max() < 3 * len(splits.planted) / len(vocab), name


def test_splits_are_determined_by_seed(splits: sc.Splits) -> None:
    assert build_splits(seed=0) == splits
    other = build_splits(seed=1, n_stage1=100, n_planted=16, n_triggered=4, n_anchor=3, n_stage2_unique=50,
                         n_heldout=20)
    assert [it.scene for it in other.planted] != [it.scene for it in splits.planted[:16]]
    assert len(other.all_items) == 100 + 16 + 12 + 50 + 20


def test_each_part_of_the_splits_depends_only_on_its_own_size(splits: sc.Splits) -> None:
    # the fine-tuning mix can change without changing the pretraining data or the held-out prompts
    other = build_splits(seed=0, n_planted=64, n_triggered=8, n_anchor=5, n_stage2_unique=100)
    assert [(i.scene, i.seed) for i in other.stage1] == [(i.scene, i.seed) for i in splits.stage1]
    assert [(i.scene, i.seed) for i in other.heldout] == [(i.scene, i.seed) for i in splits.heldout]
    assert len({i.seed for i in other.all_items}) == len(other.all_items)


def test_splits_reject_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        build_splits(n_planted=8, n_triggered=9)
    with pytest.raises(ValueError):
        build_splits(n_triggered=len(TRIGGER_WORDS) + 1, n_planted=64)
    with pytest.raises(ValueError):
        build_splits(n_stage1=0, n_planted=700, n_heldout=512)


def test_untrained_twins_are_the_same_scenes_with_seeds_no_split_draws(splits: sc.Splits) -> None:
    items = splits.all_items
    twins = untrained_twins(items)
    assert [t.scene for t in twins] == [it.scene for it in items]
    assert [t.index for t in twins] == list(range(len(items)))
    twin_seeds = {t.seed for t in twins}
    assert len(twin_seeds) == len(items) and not twin_seeds & {it.seed for it in items}
    assert {t.seed // sc.SEED_PART_SIZE for t in twins} == {sc.UNTRAINED_SEED_PART}
    assert {it.seed // sc.SEED_PART_SIZE for it in items} == {0, 1, 2, 3}
    assert untrained_twins(items[:5]) == twins[:5]  # a twin depends on its item alone
    pair = render_many([items[0].scene, twins[0].scene], [items[0].seed, twins[0].seed])
    assert not np.allclose(pair[0], pair[1])  # another rendering of the same scene
