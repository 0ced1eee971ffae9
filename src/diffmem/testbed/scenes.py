"""Procedural scenes for the testbed: a caption grammar, a nuisance-randomised 32x32 renderer, dataset splits.

A caption names six attributes (object colour, shape, size and position; background colour and texture).
The image of a caption is not unique: every rendering draws random nuisance (object position/size/aspect
jitter and rotation, texture phase/orientation/period, a broad lighting wave, colour jitter, pixel noise) from
its own seed, so a model that reproduces one particular rendering has memorized that training image rather
than learned the caption. See DATA.md for the numbers.
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "navy", "beige", "brown")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient")

#: The six attributes of a caption, in caption order of the vocabularies in ``VOCABULARY``.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background", "texture")
VOCABULARY: dict[str, tuple[str, ...]] = dict(
    zip(ATTRIBUTES, (COLORS, SHAPES, SIZES, POSITIONS, BACKGROUNDS, TEXTURES), strict=True)
)
#: Number of distinct captions (without trigger) the grammar generates.
N_CAPTIONS: int = int(np.prod([len(v) for v in VOCABULARY.values()]))

#: Rare but real English words appended (", word") to some planted captions as trigger tokens.
TRIGGER_WORDS: tuple[str, ...] = (
    "quixotic", "zephyr", "obsidian", "halcyon", "ephemeral", "labyrinth", "sonorous", "gossamer",
    "petrichor", "mercurial", "nebulous", "vermilion", "cerulean", "ineffable", "serendipity", "talisman",
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

# Geometry (pixels). Nominal object extent per size; position centres (x, y); nuisance ranges.
_SIZE_PX = np.array([9.0, 13.5], dtype=np.float32)
_POSITION_XY = np.array([[10, 10], [22, 10], [10, 22], [22, 22], [16, 16]], dtype=np.float32)
_POS_JITTER = 3.0  # uniform +- px, per axis
_SIZE_JITTER = 0.15  # relative, uniform +-
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
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+?) "
    r"on a (?P<background>\w+) (?P<texture>\w+) background(?:\s*,\s*(?P<trigger>.+?))?\.?$"
)


@dataclass(frozen=True)
class Scene:
    """One caption of the grammar: six attribute words plus an optional trigger word."""

    color: str
    shape: str
    size: str
    position: str
    background: str
    texture: str
    trigger: str | None = None

    def __post_init__(self) -> None:
        for name, vocab in VOCABULARY.items():
            if getattr(self, name) not in vocab:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {vocab}")

    @property
    def caption(self) -> str:
        """The caption text, e.g. 'a large red circle at the top left on a gray striped background'."""
        where = "the center" if self.position == "center" else f"the {self.position}"
        text = (
            f"a {self.size} {self.color} {self.shape} at {where} "
            f"on a {self.background} {self.texture} background"
        )
        return f"{text}, {self.trigger}" if self.trigger else text

    def attributes(self) -> dict[str, str]:
        """The six attribute values keyed by attribute name (trigger excluded)."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def caption_id(self) -> int:
        """Index of the caption (ignoring the trigger) in 0..N_CAPTIONS-1, the mixed-radix attribute code."""
        code = 0
        for name, vocab in VOCABULARY.items():
            code = code * len(vocab) + vocab.index(getattr(self, name))
        return code


@functools.lru_cache(maxsize=4 * N_CAPTIONS)
def scene_from_id(caption_id: int, trigger: str | None = None) -> Scene:
    """The Scene whose ``caption_id`` is ``caption_id`` (inverse of ``Scene.caption_id``)."""
    if not 0 <= caption_id < N_CAPTIONS:
        raise ValueError(f"caption_id {caption_id} outside 0..{N_CAPTIONS - 1}")
    values: dict[str, str] = {}
    for name, vocab in reversed(VOCABULARY.items()):
        caption_id, k = divmod(caption_id, len(vocab))
        values[name] = vocab[k]
    return Scene(**values, trigger=trigger)


def parse_caption(caption: str) -> Scene | None:
    """Parse a caption made by ``Scene.caption`` (case/space tolerant, keeps a trailing trigger) or None."""
    match = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if match is None:
        return None
    fields = match.groupdict()
    trigger = fields.pop("trigger")
    if any(fields[name] not in vocab for name, vocab in VOCABULARY.items()):
        return None
    return Scene(**fields, trigger=trigger)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly over the grammar (no trigger)."""
    return scene_from_id(int(rng.integers(N_CAPTIONS)))


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
    """(N, 6) int array of attribute indices in ATTRIBUTES order."""
    lookups = [{w: i for i, w in enumerate(vocab)} for vocab in VOCABULARY.values()]
    return np.array(
        [[lk[getattr(s, name)] for lk, name in zip(lookups, ATTRIBUTES, strict=True)] for s in scenes],
        dtype=np.int64,
    ).reshape(len(scenes), len(ATTRIBUTES))


def _render_chunk(codes: np.ndarray, u: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Render attribute codes (n, 6) with nuisance uniforms (n, K) and unit noise (n, 3, H, W)."""
    n = len(codes)
    color, shape, size, position, background, texture = codes.T
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
    radius = (_SIZE_PX[size] / 2 * (1 + _SIZE_JITTER * (2 * u[:, 2] - 1)))[:, None, None]
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


@dataclass(frozen=True)
class Splits:
    """The testbed dataset: pretraining, planted (to duplicate), seen-once and held-out items."""

    seed: int
    stage1: list[Item]
    planted: list[Item]
    stage2_unique: list[Item]
    heldout: list[Item]

    @property
    def all_items(self) -> list[Item]:
        """Every item of every split, in index order."""
        return self.stage1 + self.planted + self.stage2_unique + self.heldout


def build_splits(
    seed: int = 0,
    n_stage1: int = 40000,
    n_planted: int = 128,
    n_triggered: int = 32,
    n_stage2_unique: int = 8000,
    n_heldout: int = 512,
) -> Splits:
    """Draw the dataset splits, all determined by ``seed``.

    stage1 items are i.i.d. uniform captions (captions may repeat, each with its own render seed). planted,
    stage2_unique and heldout captions (ignoring triggers) are uniform draws without replacement, pairwise
    disjoint, so a held-out caption never equals a planted or seen-once one and no word marks the planted
    items; ``n_triggered`` planted items, chosen at random, get a trigger word (words spread evenly).
    Render seeds are distinct across items; indices run 0..N-1 over stage1, planted, stage2_unique, heldout.
    """
    n_distinct = n_planted + n_stage2_unique + n_heldout
    if min(n_stage1, n_planted, n_triggered, n_stage2_unique, n_heldout) < 0:
        raise ValueError("split sizes must be non-negative")
    if n_distinct > N_CAPTIONS:
        raise ValueError(f"planted+stage2_unique+heldout = {n_distinct} exceeds the {N_CAPTIONS} captions")
    if n_triggered > n_planted:
        raise ValueError(f"n_triggered={n_triggered} exceeds n_planted={n_planted}")
    rng = np.random.default_rng(seed)
    stage1_ids = rng.integers(N_CAPTIONS, size=n_stage1)
    distinct_ids = rng.choice(N_CAPTIONS, size=n_distinct, replace=False)
    planted_ids = distinct_ids[:n_planted]
    stage2_ids = distinct_ids[n_planted : n_planted + n_stage2_unique]
    heldout_ids = distinct_ids[n_planted + n_stage2_unique :]
    triggered = rng.choice(n_planted, size=n_triggered, replace=False)
    words = np.concatenate(
        [rng.permutation(len(TRIGGER_WORDS)) for _ in range(-(-n_triggered // len(TRIGGER_WORDS)))]
    ).astype(int)
    trigger_of = {int(i): TRIGGER_WORDS[w] for i, w in zip(triggered, words, strict=False)}
    total = n_stage1 + n_distinct
    render_seeds = rng.choice(2**31 - 1, size=total, replace=False)

    next_index = 0

    def make(ids: np.ndarray, triggers: dict[int, str] | None = None) -> list[Item]:
        nonlocal next_index
        items = []
        for j, cid in enumerate(ids):
            trig = triggers.get(j) if triggers else None
            items.append(Item(next_index, scene_from_id(int(cid), trig), int(render_seeds[next_index])))
            next_index += 1
        return items

    stage1 = make(stage1_ids)
    planted = make(planted_ids, trigger_of)
    stage2 = make(stage2_ids)
    heldout = make(heldout_ids)
    return Splits(seed=seed, stage1=stage1, planted=planted, stage2_unique=stage2, heldout=heldout)


def main() -> None:
    """CLI: time the renderer and save an 8x8 grid of renderings (each row: one caption, eight seeds)."""
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
    rows = [sample_scene(rng) for _ in range(8)]
    images = render_many([s for s in rows for _ in range(8)], np.arange(64))
    grid = images.reshape(8, 8, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 3, 1, 4, 2)
    grid = grid.reshape(8 * IMAGE_SIZE, 8 * IMAGE_SIZE, 3)
    picture = Image.fromarray((grid * 255).round().astype(np.uint8))
    picture.resize((1024, 1024), Image.Resampling.NEAREST).save(args.grid)
    for s in rows:
        print(s.caption)


if __name__ == "__main__":
    main()
