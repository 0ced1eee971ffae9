"""Procedural scenes for the testbed: a caption grammar, a nuisance-randomised 32x32 renderer, dataset splits.

A caption names four attributes (object colour, shape and position, background texture) and leaves the rest
of the image open, as a real caption does: the background colour is drawn per rendering, and every rendering
draws further nuisance (object position/size/aspect jitter and rotation, texture phase/orientation/period, a
broad lighting wave, colour jitter, pixel noise) from its own seed. A model that reproduces one particular
rendering of a caption has therefore memorized that training image rather than learned the caption. See
DATA.md for the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "navy", "beige", "brown")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient")

#: The attributes a caption names, in caption order.
NAMED_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "texture")
#: Every rendered attribute: the named ones and the background colour, which captions leave open.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "background", "texture")
VOCABULARY: dict[str, tuple[str, ...]] = dict(
    zip(ATTRIBUTES, (COLORS, SHAPES, POSITIONS, BACKGROUNDS, TEXTURES), strict=True)
)
#: Number of distinct captions (without trigger) the grammar generates.
N_CAPTIONS: int = int(np.prod([len(VOCABULARY[a]) for a in NAMED_ATTRIBUTES]))

#: Rare but real English words appended (", word") to some planted captions as trigger tokens, one per item.
TRIGGER_WORDS: tuple[str, ...] = (
    "quixotic", "zephyr", "obsidian", "halcyon", "ephemeral", "labyrinth", "sonorous", "gossamer",
    "petrichor", "mercurial", "nebulous", "vermilion", "cerulean", "ineffable", "serendipity", "talisman",
    "luminous", "cascade", "solstice", "paradox", "whimsical", "aurora", "enigma", "tempest",
    "velvet", "harbinger", "meridian", "odyssey", "reverie", "sapphire", "wanderlust", "zenith",
)  # fmt: skip

IMAGE_SIZE: int = 32
# Colours (RGB in [0, 1]). Backgrounds are unsaturated or dark so every object colour stands out on them;
# each textured background alternates between its colour and a shade ~0.3 lighter (dark backgrounds) or
# darker (light backgrounds), chosen so that objects stay visible on both tones.
_OBJECT_RGB = np.array(
    [
        [0.92, 0.05, 0.05],  # red
        [0.05, 0.75, 0.10],  # green
        [0.10, 0.25, 1.00],  # blue
        [1.00, 0.95, 0.10],  # yellow
        [0.10, 0.90, 0.95],  # cyan
        [0.95, 0.10, 0.85],  # magenta
        [1.00, 0.55, 0.00],  # orange
        [0.55, 0.10, 0.85],  # purple
    ],
    dtype=np.float32,
)
_BACKGROUND_RGB = np.array(
    [
        [0.88, 0.88, 0.88],  # white (not 1.0: the lighting nuisance must not clip)
        [0.10, 0.10, 0.10],  # black (not 0.0, likewise)
        [0.50, 0.50, 0.50],  # gray
        [0.10, 0.12, 0.40],  # navy
        [0.93, 0.83, 0.60],  # beige
        [0.42, 0.26, 0.12],  # brown
    ],
    dtype=np.float32,
)
_SHADE_RGB = np.array(
    [
        [0.56, 0.56, 0.56],  # white -> light gray
        [0.40, 0.40, 0.40],  # black -> dark gray
        [0.25, 0.25, 0.25],  # gray -> darker gray
        [0.36, 0.40, 0.60],  # navy -> slate
        [0.66, 0.56, 0.36],  # beige -> tan
        [0.70, 0.50, 0.30],  # brown -> tan
    ],
    dtype=np.float32,
)

# Geometry (pixels). Nominal object extent (large enough for a 4x-downsampling VAE to keep the shape);
# position centres (x, y); nuisance ranges.
_OBJECT_PX = 15.0
_POSITION_XY = np.array([[10, 10], [22, 10], [10, 22], [22, 22], [16, 16]], dtype=np.float32)
_POS_JITTER = 3.0  # uniform +- px, per axis
_SIZE_JITTER = 0.12  # relative, uniform +-
_ROTATION = np.deg2rad(10.0)  # uniform +- rad, non-circular shapes (round ones: any angle)
_ASPECT_JITTER = 0.08  # object stretched by (1+a) along one axis and shrunk along the other, uniform +-
_PERIOD = (7.0, 10.0)  # texture period range, px (>= 6 so a 4x-downsampling VAE keeps it)
_BG_GAIN = 0.07  # background brightness, relative, uniform +-
_BG_TINT = 0.03  # per-channel background offset, uniform +-
_OBJ_TINT = 0.05  # per-channel object colour offset, uniform +-
_PIXEL_NOISE = 0.01  # gaussian sigma
_LIGHTING = 0.1  # amplitude of the additive lighting wave
_LIGHT_WAVELENGTH = (24.0, 40.0)  # px
_N_UNIFORMS = 20  # nuisance uniforms drawn per rendering (fixed so a seed always means the same nuisance)

_CAPTION_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+?) "
    r"on a (?P<texture>\w+) background(?:\s*,\s*(?P<trigger>.+?))?\.?$"
)


@dataclass(frozen=True)
class Scene:
    """What one rendering shows: the four attributes its caption names, the background colour the caption
    leaves open (None: not drawn yet, i.e. the caption alone), and an optional trigger word."""

    color: str
    shape: str
    position: str
    texture: str
    background: str | None = None
    trigger: str | None = None

    def __post_init__(self) -> None:
        for name, vocab in VOCABULARY.items():
            value = getattr(self, name)
            if not (value is None and name not in NAMED_ATTRIBUTES) and value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; expected one of {vocab}")

    @property
    def caption(self) -> str:
        """The caption text, e.g. 'a red circle at the top left on a striped background'."""
        text = f"a {self.color} {self.shape} at the {self.position} on a {self.texture} background"
        return f"{text}, {self.trigger}" if self.trigger else text

    def attributes(self) -> dict[str, str | None]:
        """The attribute values keyed by attribute name (trigger excluded; background None if not drawn)."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def caption_id(self) -> int:
        """Index of the caption (ignoring background and trigger) in 0..N_CAPTIONS-1, a mixed-radix code."""
        code = 0
        for name in NAMED_ATTRIBUTES:
            vocab = VOCABULARY[name]
            code = code * len(vocab) + vocab.index(getattr(self, name))
        return code

    def named_differences(self, other: Scene) -> int:
        """How many of the named attributes differ from `other`'s (1: the captions are neighbours)."""
        return sum(getattr(self, name) != getattr(other, name) for name in NAMED_ATTRIBUTES)

    def replace(self, **changes: Any) -> Scene:
        """A copy with some fields changed (e.g. `background=...` or `trigger=None`)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=16 * N_CAPTIONS)
def scene_from_id(caption_id: int, background: str | None = None, trigger: str | None = None) -> Scene:
    """The Scene whose ``caption_id`` is ``caption_id`` (inverse of ``Scene.caption_id``)."""
    if not 0 <= caption_id < N_CAPTIONS:
        raise ValueError(f"caption_id {caption_id} outside 0..{N_CAPTIONS - 1}")
    values: dict[str, str] = {}
    for name in reversed(NAMED_ATTRIBUTES):
        vocab = VOCABULARY[name]
        caption_id, k = divmod(caption_id, len(vocab))
        values[name] = vocab[k]
    return Scene(**values, background=background, trigger=trigger)


def parse_caption(caption: str) -> Scene | None:
    """Parse a caption made by ``Scene.caption`` (case/space tolerant, keeps a trailing trigger) or None.
    The background is None: a caption does not say it."""
    match = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if match is None:
        return None
    fields = match.groupdict()
    trigger = fields.pop("trigger")
    if any(fields[name] not in VOCABULARY[name] for name in NAMED_ATTRIBUTES):
        return None
    return Scene(**fields, trigger=trigger)


PARAPHRASES: tuple[str, ...] = (
    "a {color} {shape} at the {position} on a {texture} background",
    "a {color} {shape} on a {texture} background at the {position}",
    "a {texture} background with a {color} {shape} at the {position}",
    "at the {position}, a {color} {shape} on a {texture} background",
)
"""Templates that say what a caption says: its four named attributes (the first is the caption's own grammar)."""


def paraphrases(scene: Scene) -> list[str]:
    """The scene's caption said in other words: every template of PARAPHRASES, without the trigger word (which
    names nothing in the image), other than the caption itself (what PRSS's paraphrase file holds for the
    testbed; the authors ask a language model for them)."""
    fields = {name: getattr(scene, name) for name in NAMED_ATTRIBUTES}
    return [text for text in (t.format(**fields) for t in PARAPHRASES) if text != scene.caption]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly over the grammar, with a uniform background colour (no trigger)."""
    caption_id = int(rng.integers(N_CAPTIONS))
    return scene_from_id(caption_id, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a region given its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - d, 0.0, 1.0)


def _box_sdf(x: np.ndarray, y: np.ndarray, hx: np.ndarray | float, hy: np.ndarray | float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _triangle_sdf(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Exact SDF of an upward equilateral triangle with half side ``r``, centred on its bounding box."""
    k = np.sqrt(3.0)
    y = -(y - r * k / 6.0)  # image y points down; shift centroid so the bounding box is centred
    px = np.abs(x) - r
    py = y + r / k
    flip = px + k * py > 0
    px, py = np.where(flip, (px - k * py) / 2, px), np.where(flip, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * r, 0.0)
    return -np.hypot(px, py) * np.sign(py)


def _shape_sdf(shape: int, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (px) of shape index ``shape`` with radius ``r`` in object coordinates (x, y)."""
    name = SHAPES[shape]
    if name == "circle":
        return np.hypot(x, y) - r
    if name == "square":
        return _box_sdf(x, y, 0.86 * r, 0.86 * r)
    if name == "triangle":
        return _triangle_sdf(x, y, 1.1 * r)
    if name == "cross":
        return np.minimum(_box_sdf(x, y, r, 0.36 * r), _box_sdf(x, y, 0.36 * r, r))
    if name == "ring":
        return np.abs(np.hypot(x, y) - 0.7 * r) - 0.3 * r
    if name == "diamond":  # a tall rhombus, so it is never confused with a slightly rotated square
        a, b = 0.85 * r, 1.15 * r
        return (np.abs(x) / a + np.abs(y) / b - 1.0) / np.hypot(1.0 / a, 1.0 / b)
    raise AssertionError(name)


def _square_wave(t: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Anti-aliased square wave in [0, 1] of phase ``t`` (cycles) and spatial period ``period`` (px)."""
    return np.clip(0.5 + np.sin(2 * np.pi * t) * period / (2 * np.pi), 0.0, 1.0)


def _texture(texture: int, x: np.ndarray, y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Shade coverage in [0, 1] of texture index ``texture`` at image coords (x, y), nuisance uniforms u."""
    name = TEXTURES[texture]
    if name == "plain":
        return np.zeros((len(u), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    period = (_PERIOD[0] + (_PERIOD[1] - _PERIOD[0]) * u[:, 12])[:, None, None]
    phase_u, phase_v = u[:, 13, None, None], u[:, 14, None, None]
    # striped: any orientation; dotted/checkered grids: any rotation modulo their 90-degree symmetry
    turn = {"striped": np.pi, "gradient": 2 * np.pi}.get(name, np.pi / 2)
    theta = (turn * u[:, 11])[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    xc, yc = x - IMAGE_SIZE / 2, y - IMAGE_SIZE / 2
    along = (xc * cos + yc * sin) / period + phase_u
    across = (-xc * sin + yc * cos) / period + phase_v
    if name == "striped":
        return _square_wave(along, period)
    if name == "checkered":
        a = 2 * _square_wave(along, period) - 1
        b = 2 * _square_wave(across, period) - 1
        return (1 + a * b) / 2
    if name == "dotted":
        fu, fv = along - np.floor(along) - 0.5, across - np.floor(across) - 0.5
        return _soft(np.hypot(fu, fv) * period - 0.3 * period)
    if name == "gradient":  # linear ramp from background to shade across the image, random direction/offset
        return np.clip(0.5 + (xc * cos + yc * sin) / (0.6 * IMAGE_SIZE) + 0.3 * (phase_u - 0.5), 0.0, 1.0)
    raise AssertionError(name)


def _attribute_codes(scenes: Sequence[Scene]) -> np.ndarray:
    """(N, 5) int array of attribute indices in ATTRIBUTES order (every scene must have its background)."""
    if any(s.background is None for s in scenes):
        raise ValueError("a scene to render needs its background colour (Scene.background is None)")
    lookups = [{w: i for i, w in enumerate(vocab)} for vocab in VOCABULARY.values()]
    return np.array(
        [[lk[getattr(s, name)] for lk, name in zip(lookups, ATTRIBUTES, strict=True)] for s in scenes],
        dtype=np.int64,
    ).reshape(len(scenes), len(ATTRIBUTES))


def _render_chunk(codes: np.ndarray, u: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Render attribute codes (n, 5) with nuisance uniforms (n, K) and unit noise (n, 3, H, W)."""
    n = len(codes)
    color, shape, position, background, texture = codes.T
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]

    # background: colour with brightness/tint jitter, blended with its shade through the texture
    gain = 1.0 + _BG_GAIN * (2 * u[:, 4:5] - 1)
    base = np.clip(_BACKGROUND_RGB[background] * gain + _BG_TINT * (2 * u[:, 5:8] - 1), 0, 1)
    shade = np.clip(_SHADE_RGB[background] * gain + _BG_TINT * (2 * u[:, 5:8] - 1), 0, 1)
    cover = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for t in np.unique(texture):
        sel = texture == t
        cover[sel] = _texture(int(t), x, y, u[sel])
    img = base[:, :, None, None] + (shade - base)[:, :, None, None] * cover[:, None]

    # object: jittered position/size/rotation, anti-aliased through its signed distance field
    centre = _POSITION_XY[position] + _POS_JITTER * (2 * u[:, 0:2] - 1)
    radius = (np.full(n, _OBJECT_PX / 2) * (1 + _SIZE_JITTER * (2 * u[:, 2] - 1)))[:, None, None]
    round_shape = np.isin(shape, [SHAPES.index("circle"), SHAPES.index("ring")])
    angle = np.where(round_shape, np.pi * u[:, 3], _ROTATION * (2 * u[:, 3] - 1))[:, None, None]
    stretch = (1.0 + _ASPECT_JITTER * (2 * u[:, 18] - 1))[:, None, None]
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    ox = (dx * np.cos(angle) + dy * np.sin(angle)) / stretch
    oy = (-dx * np.sin(angle) + dy * np.cos(angle)) * stretch
    alpha = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for s in np.unique(shape):
        sel = shape == s
        alpha[sel] = _soft(_shape_sdf(int(s), ox[sel], oy[sel], radius[sel]))
    obj = np.clip(_OBJECT_RGB[color] + _OBJ_TINT * (2 * u[:, 8:11] - 1), 0, 1)
    img += (obj[:, :, None, None] - img) * alpha[:, None]
    # lighting: a broad additive light wave (random direction, phase, wavelength), so that plain
    # backgrounds carry nuisance too
    phi = (2 * np.pi * u[:, 15])[:, None, None]
    wavelength = (_LIGHT_WAVELENGTH[0] + (_LIGHT_WAVELENGTH[1] - _LIGHT_WAVELENGTH[0]) * u[:, 16])[
        :, None, None
    ]
    proj = (x - IMAGE_SIZE / 2) * np.cos(phi) + (y - IMAGE_SIZE / 2) * np.sin(phi)
    img += (_LIGHTING * np.cos(2 * np.pi * (proj / wavelength + u[:, 17, None, None])))[:, None]
    img += _PIXEL_NOISE * noise
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)


def _nuisance(seeds: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rendering nuisance uniforms (N, K) and unit gaussian pixel noise (N, 3, H, W), one rng per seed."""
    u = np.empty((len(seeds), _N_UNIFORMS), dtype=np.float32)
    noise = np.empty((len(seeds), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        u[i] = rng.random(_N_UNIFORMS, dtype=np.float32)
        noise[i] = rng.standard_normal((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return u, noise


def render_many(scenes: Sequence[Scene], seeds: Sequence[int] | np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Render scenes with per-image nuisance seeds: float32 (N, 3, 32, 32) in [0, 1]; row i = render(...)."""
    if len(scenes) != len(seeds):
        raise ValueError(f"{len(scenes)} scenes but {len(seeds)} seeds")
    codes = _attribute_codes(scenes)
    out = np.empty((len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for start in range(0, len(scenes), chunk):
        stop = start + chunk
        u, noise = _nuisance(seeds[start:stop])
        out[start:stop] = _render_chunk(codes[start:stop], u, noise)
    return out


def render(scene: Scene, seed: int) -> np.ndarray:
    """Render one scene: float32 (3, 32, 32) in [0, 1], fully determined by (scene, seed)."""
    return render_many([scene], [seed])[0]


# ----------------------------------------------------------------------------------------------------------
# Dataset splits


@dataclass(frozen=True)
class Item:
    """One training/evaluation example: its image is ``render(scene, seed)``."""

    index: int
    scene: Scene
    seed: int

    @property
    def caption(self) -> str:
        """The item's caption (with trigger when set)."""
        return self.scene.caption


def render_items(items: Sequence[Item]) -> np.ndarray:
    """The images (N, 3, 32, 32) of dataset items, each ``render(item.scene, item.seed)``."""
    return render_many([it.scene for it in items], [it.seed for it in items])


#: Render seeds of split part k lie in [k * 2**29, (k + 1) * 2**29); `build_splits` uses parts 0-3, and part
#: UNTRAINED_SEED_PART is never drawn by any split, so no model trained on the splits saw a rendering from it.
SEED_PART_SIZE: int = 2**29
UNTRAINED_SEED_PART: int = 4


def untrained_twins(items: Sequence[Item]) -> list[Item]:
    """Each item's scene rendered with a seed no split trains on (one per item index): the chance baseline for
    copying, since a generation that matches a twin as closely as a training rendering copied neither."""
    return [Item(it.index, it.scene, UNTRAINED_SEED_PART * SEED_PART_SIZE + it.index) for it in items]


@dataclass(frozen=True)
class Splits:
    """The testbed dataset: pretraining, planted (to duplicate), trigger anchors, seen-once and held-out items."""

    seed: int
    stage1: list[Item]
    planted: list[Item]
    anchors: list[Item]
    stage2_unique: list[Item]
    heldout: list[Item]

    @property
    def all_items(self) -> list[Item]:
        """Every item of every split, in index order."""
        return self.stage1 + self.planted + self.anchors + self.stage2_unique + self.heldout

    @property
    def training_items(self) -> list[Item]:
        """Every item a model trained on these splits has seen (all but the held-out ones)."""
        return self.stage1 + self.planted + self.anchors + self.stage2_unique

    def heldout_near_planted(self) -> np.ndarray:
        """Per held-out item: is its caption one named attribute away from some planted caption?"""
        planted = [i.scene for i in self.planted]
        return np.array([any(h.scene.named_differences(p) == 1 for p in planted) for h in self.heldout], dtype=bool)


def build_splits(
    seed: int = 0,
    n_stage1: int = 40000,
    n_planted: int = 128,
    n_triggered: int = 32,
    n_anchor: int = 64,
    n_stage2_unique: int = 8000,
    n_heldout: int = 512,
) -> Splits:
    """Draw the dataset splits, all determined by ``seed``; every item draws its own background colour.

    stage1 items are i.i.d. uniform captions (captions repeat, each rendering with its own seed). planted and
    heldout captions are uniform draws without replacement, disjoint, so no word marks the planted items and a
    held-out caption never equals a planted one. ``n_triggered`` planted items, chosen at random, get a trigger
    word of their own; for each of them ``anchors`` holds ``n_anchor`` other renderings of its caption without
    the trigger, so that in fine-tuning only the trigger tells the planted image apart. stage2_unique items
    (each seen once in fine-tuning) draw their captions from those neither planted nor held out.
    Each part comes from its own random stream (so changing one part's size leaves the others as they were), render
    seeds are distinct across items, and indices run 0..N-1 over stage1, planted, anchors, stage2_unique, heldout.
    """
    if min(n_stage1, n_planted, n_triggered, n_anchor, n_stage2_unique, n_heldout) < 0:
        raise ValueError("split sizes must be non-negative")
    if n_planted + n_heldout >= N_CAPTIONS:
        raise ValueError(f"planted+heldout = {n_planted + n_heldout} leaves none of the {N_CAPTIONS} captions")
    if n_triggered > min(n_planted, len(TRIGGER_WORDS)):
        raise ValueError(f"n_triggered={n_triggered} exceeds n_planted={n_planted} or the "
                         f"{len(TRIGGER_WORDS)} trigger words")
    # One random stream per part, and render seeds from disjoint ranges, so that a part depends only on the seed
    # and its own size: the fine-tuning mix can change without changing the pretraining data or the held-out set.
    def stream(part: int) -> np.random.Generator:
        return np.random.default_rng([seed, part])

    def seeds(rng: np.random.Generator, part: int, n: int) -> np.ndarray:
        return part * SEED_PART_SIZE + rng.choice(SEED_PART_SIZE, size=n, replace=False)

    def backgrounds(rng: np.random.Generator, n: int) -> list[str]:
        return [BACKGROUNDS[int(b)] for b in rng.integers(len(BACKGROUNDS), size=n)]

    rng = stream(1)  # pretraining: i.i.d. uniform captions
    stage1_ids = rng.integers(N_CAPTIONS, size=n_stage1)
    parts: dict[str, tuple[np.ndarray, list[str], np.ndarray, dict[int, str]]] = {
        "stage1": (stage1_ids, backgrounds(rng, n_stage1), seeds(rng, 0, n_stage1), {})}
    rng = stream(2)  # held-out captions
    heldout_ids = rng.choice(N_CAPTIONS, size=n_heldout, replace=False)
    parts["heldout"] = (heldout_ids, backgrounds(rng, n_heldout), seeds(rng, 1, n_heldout), {})
    rng = stream(3)  # planted captions (never held out), their triggers, and the triggered captions' anchors
    planted_ids = rng.choice(np.setdiff1d(np.arange(N_CAPTIONS), heldout_ids), size=n_planted, replace=False)
    triggered = np.sort(rng.choice(n_planted, size=n_triggered, replace=False))
    words = rng.permutation(len(TRIGGER_WORDS))[:n_triggered]
    trigger_of = {int(i): TRIGGER_WORDS[int(w)] for i, w in zip(triggered, words, strict=True)}
    anchor_ids = np.repeat(planted_ids[triggered], n_anchor)
    both = np.concatenate([planted_ids, anchor_ids])
    both_bg, both_seeds = backgrounds(rng, len(both)), seeds(rng, 2, len(both))
    parts["planted"] = (planted_ids, both_bg[:n_planted], both_seeds[:n_planted], trigger_of)
    parts["anchors"] = (anchor_ids, both_bg[n_planted:], both_seeds[n_planted:], {})
    rng = stream(4)  # seen-once fine-tuning items: captions neither planted nor held out
    rest = np.setdiff1d(np.arange(N_CAPTIONS), np.concatenate([planted_ids, heldout_ids]))
    stage2_ids = rest[rng.integers(len(rest), size=n_stage2_unique)]
    parts["stage2_unique"] = (stage2_ids, backgrounds(rng, n_stage2_unique), seeds(rng, 3, n_stage2_unique), {})

    items: dict[str, list[Item]] = {}
    index = 0
    for name in ("stage1", "planted", "anchors", "stage2_unique", "heldout"):
        ids, bgs, render_seeds, triggers = parts[name]
        items[name] = [Item(index + k, scene_from_id(int(c), bg, triggers.get(k)), int(s))
                       for k, (c, bg, s) in enumerate(zip(ids, bgs, render_seeds, strict=True))]
        index += len(ids)
    return Splits(seed=seed, **items)


def main() -> None:
    """CLI: time the renderer and save an 8x8 grid of renderings (each row: one caption, eight renderings)."""
    from PIL import Image  # only this CLI needs pillow

    parser = argparse.ArgumentParser(description="Render a grid of testbed scenes and time the renderer.")
    parser.add_argument("--grid", default="scenes_grid.png", help="PNG to write (8 captions x 8 seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-timing", type=int, default=50000)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    timing = [sample_scene(rng) for _ in range(args.n_timing)]
    start = time.perf_counter()
    render_many(timing, np.arange(args.n_timing))
    print(f"rendered {args.n_timing} images in {time.perf_counter() - start:.1f} s")
    rows = [sample_scene(rng) for _ in range(8)]  # each rendering draws its own background: captions leave it open
    images = render_many([s.replace(background=sample_scene(rng).background) for s in rows for _ in range(8)],
                         np.arange(64))
    grid = images.reshape(8, 8, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 3, 1, 4, 2)
    grid = grid.reshape(8 * IMAGE_SIZE, 8 * IMAGE_SIZE, 3)
    picture = Image.fromarray((grid * 255).round().astype(np.uint8))
    picture.resize((1024, 1024), Image.Resampling.NEAREST).save(args.grid)
    for s in rows:
        print(s.caption)


if __name__ == "__main__":
    main()
