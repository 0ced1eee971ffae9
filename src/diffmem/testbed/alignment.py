"""Caption alignment for testbed images: a small CNN that reads the five scene attributes back from an image.

``aligned`` says whether a (generated) image shows what its caption asks for (object colour, shape and
position, background texture; the caption leaves the background colour open), so that memorization metrics
can be set against prompt fidelity. The network is trained on renderings with blur/noise/brightness
augmentation and, for half of each batch, the testbed VAE's round trip, so it reads generations (which all
come out of that decoder) as well as renders. Regenerate the shipped weights with
``python -m diffmem.testbed.alignment`` after the testbed itself is retrained.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffmem.io.files import read_json_object
from diffmem.testbed.scenes import (
    ATTRIBUTES,
    IMAGE_SIZE,
    NAMED_ATTRIBUTES,
    POSITIONS,
    VOCABULARY,
    Scene,
    render_many,
    sample_scene,
)
from diffmem.testbed.similarity import degrade, gaussian_blur

Roundtrip = Callable[[np.ndarray], np.ndarray]

#: Attributes that must all be read as the caption says for an image to count as aligned: all it names.
ALIGNED_ATTRIBUTES: tuple[str, ...] = NAMED_ATTRIBUTES
WEIGHTS_PATH: Path = Path(__file__).parent / "assets" / "alignment.safetensors"

# a horizontal flip maps "left" positions to "right" ones; every shape and texture is flip-symmetric
_FLIP_POSITION = torch.tensor(
    [
        POSITIONS.index(p.replace("left", "_").replace("right", "left").replace("_", "right"))
        for p in POSITIONS
    ]
)


class AttributeClassifier(nn.Module):
    """Five 3x3 conv layers (two stride 2), a 4x4 spatial summary, one linear head per attribute."""

    def __init__(self, widths: tuple[int, int, int, int, int] = (16, 32, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, stride in zip(widths, (1, 2, 1, 2, 1), strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.heads = nn.ModuleDict({a: nn.Linear(c_in * 16, len(v)) for a, v in VOCABULARY.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images (N, 3, 32, 32) in [0, 1]."""
        h = self.features((x - 0.5) / 0.25)
        return {a: head(h) for a, head in self.heads.items()}


def _labels(scenes: Sequence[Scene]) -> torch.Tensor:
    """(N, 5) attribute indices in ATTRIBUTES order (-1 for a background the scene leaves open)."""
    return torch.tensor([[VOCABULARY[a].index(v) if (v := getattr(s, a)) is not None else -1 for a in ATTRIBUTES]
                         for s in scenes], dtype=torch.long).reshape(len(scenes), len(ATTRIBUTES))


def _random_scenes(rng: np.random.Generator, n: int) -> tuple[list[Scene], np.ndarray]:
    """n uniform scenes and n render seeds, all from ``rng``."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return scenes, rng.integers(2**31 - 1, size=n)


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gaussian blur (sigma 0-1 px), brightness/contrast change, pixel noise (sigma 0-0.05)."""
    n = len(images)
    x = gaussian_blur(images, np.round(rng.uniform(0.0, 1.0, n), 1))  # sigma in 0.1 px steps
    gain = rng.uniform(0.92, 1.08, (n, 1, 1, 1)).astype(np.float32)
    offset = rng.uniform(-0.04, 0.04, (n, 1, 1, 1)).astype(np.float32)
    noise = rng.uniform(0.0, 0.05, (n, 1, 1, 1)).astype(np.float32) * rng.standard_normal(
        x.shape, dtype=np.float32
    )
    return np.clip(x * gain + offset + noise, 0.0, 1.0)


def train_alignment_classifier(
    seed: int = 0,
    steps: int = 1000,
    batch_size: int = 128,
    n_train: int = 30000,
    out: Path | str | None = WEIGHTS_PATH,
    log_every: int = 250,
    roundtrip: Roundtrip | None = None,
) -> AttributeClassifier:
    """Train the attribute classifier on augmented renderings (seeded); save to ``out`` unless None.

    Training images come from a pool of ``n_train`` renderings drawn from ``seed``; evaluation uses
    other draws. With ``roundtrip`` (images -> images, the testbed VAE's encode/decode), each batch row is
    taken from the round-tripped pool with probability 1/2.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: same bits whatever the core count, and fastest at this size
    try:
        return _train(seed, steps, batch_size, n_train, out, log_every, roundtrip)
    finally:
        torch.set_num_threads(threads)


def _train(
    seed: int, steps: int, batch_size: int, n_train: int, out: Path | str | None, log_every: int,
    roundtrip: Roundtrip | None,
) -> AttributeClassifier:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    scenes, seeds = _random_scenes(rng, n_train)
    pool, labels = render_many(scenes, seeds), _labels(scenes)
    pools = np.stack([pool, roundtrip(pool)]) if roundtrip is not None else pool[None]
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start = time.time()
    for step in range(steps):
        idx = rng.integers(n_train, size=batch_size)
        source = rng.integers(len(pools), size=batch_size)
        x = torch.from_numpy(_augment(pools[source, idx], rng))
        y = labels[idx].clone()
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x[flip] = x[flip].flip(-1)
        y[flip, ATTRIBUTES.index("position")] = _FLIP_POSITION[y[flip, ATTRIBUTES.index("position")]]
        logits = model(x)
        loss = sum(loss_fn(logits[a], y[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return model


@functools.lru_cache(maxsize=4)
def load_alignment_classifier(path: Path | str = WEIGHTS_PATH) -> AttributeClassifier:
    """The trained attribute classifier from a safetensors file (default: shipped weights), in eval mode."""
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _predict_codes(
    images: np.ndarray, model: AttributeClassifier | None, batch_size: int = 1024
) -> np.ndarray:
    """(N, 5) predicted attribute indices in ATTRIBUTES order."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.shape}")
    model = model if model is not None else load_alignment_classifier()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(images[start : start + batch_size]))
            chunks.append(torch.stack([logits[a].argmax(1) for a in ATTRIBUTES], 1))
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(ATTRIBUTES)), dtype=np.int64)


def predict_attributes(images: np.ndarray, model: AttributeClassifier | None = None) -> list[dict[str, str]]:
    """The attribute words the classifier reads in each image (N, 3, 32, 32) in [0, 1]."""
    return [
        {a: VOCABULARY[a][k] for a, k in zip(ATTRIBUTES, row, strict=True)}
        for row in _predict_codes(images, model)
    ]


def _correct(images: np.ndarray, scenes: Sequence[Scene], model: AttributeClassifier | None) -> np.ndarray:
    """(N, 5) bool: attribute read as the scene says (False for an open background)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    return _predict_codes(images, model) == _labels(scenes).numpy().reshape(len(scenes), len(ATTRIBUTES))


def attribute_accuracy(
    images: np.ndarray, scenes: Sequence[Scene], model: AttributeClassifier | None = None
) -> dict[str, float]:
    """Fraction of images whose attribute is read as its scene says, for each attribute the scenes set."""
    correct = _correct(images, scenes, model)
    return {a: float(correct[:, i].mean()) for i, a in enumerate(ATTRIBUTES)
            if all(getattr(s, a) is not None for s in scenes)}


def aligned(
    images: np.ndarray, scenes: Sequence[Scene], model: AttributeClassifier | None = None
) -> np.ndarray:
    """Per image: every attribute its caption names (colour, shape, position, texture) read as it says."""
    cols = [ATTRIBUTES.index(a) for a in ALIGNED_ATTRIBUTES]
    return np.asarray(_correct(images, scenes, model)[:, cols].all(axis=1))


def evaluate_alignment_classifier(
    n: int = 5000, seed: int = 12345, model: AttributeClassifier | None = None, roundtrip: Roundtrip | None = None
) -> dict[str, dict[str, float]]:
    """Held-out accuracy per attribute on n fresh renderings: clean, degraded (blur 0.7 px, noise 0.02) and,
    with ``roundtrip``, through the VAE."""
    scenes, seeds = _random_scenes(np.random.default_rng([seed, 2]), n)
    images = render_many(scenes, seeds)
    conditions = [("clean", images), ("blur0.7+noise0.02", degrade(images, 0.7, 0.02, seed=seed))]
    if roundtrip is not None:
        conditions.append(("vae_roundtrip", roundtrip(images)))
    result = {}
    for name, imgs in conditions:
        acc = attribute_accuracy(imgs, scenes, model)
        acc["aligned"] = float(aligned(imgs, scenes, model).mean())
        result[name] = acc
    return result


def _load_vae(name: str) -> Any:
    """The VAE of a pipeline `load_pipeline` takes, or of an AutoencoderKL folder (a recipe's `work/vae`)."""
    config = Path(name) / "config.json"
    if config.is_file() and read_json_object(config, "model config").get("_class_name") == "AutoencoderKL":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(name).eval()
    from diffmem.models.loading import load_pipeline

    return load_pipeline(name, device="cpu").vae


def main() -> None:
    """CLI: retrain the shipped weights deterministically and print held-out accuracies as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--vae", default="testbed",
                        help="model (or AutoencoderKL folder) whose VAE round trip augments training ('none': "
                             "train on renders only)")
    args = parser.parse_args()
    roundtrip = None
    if args.vae != "none":
        from diffmem.testbed.model import vae_roundtrip

        roundtrip = functools.partial(vae_roundtrip, _load_vae(args.vae))
    model = train_alignment_classifier(seed=args.seed, steps=args.steps, out=args.out, roundtrip=roundtrip)
    print(json.dumps(evaluate_alignment_classifier(model=model, roundtrip=roundtrip), indent=2))


if __name__ == "__main__":
    main()
