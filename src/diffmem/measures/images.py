"""The paper's image measures (METHOD.md section 5): SSCD copy similarity and CLIP score.

SSCD (Pizzi et al., CVPR 2022) reads the TorchScript descriptor files its authors publish (e.g.
`sscd_disc_mixup.torchscript.pt`); nothing is downloaded. Preprocessing is the authors' evaluation transform,
written with PIL and torch (no torchvision): resize to 288x288 (bilinear, aspect ratio not kept), scale to [0, 1],
normalise with the ImageNet mean and std. `preprocessing="wen"` is the transform Wen et al.'s evaluation (after
Somepalli et al.) used instead: shorter side to 256, centre crop 224, normalise with mean = std = 0.5.
Similarity is the cosine of L2-normalised descriptors; a generation is a copy above `SSCD_COPY_THRESHOLD`.
CLIP score is the cosine of a `transformers` CLIPModel's image and caption embeddings.
Each measure is a function of its inputs that returns tensors; loading is separate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffmem.errors import InputError
from diffmem.io.files import read_json_object

SSCD_COPY_THRESHOLD = 0.5
"""SSCD cosine similarity above which a generation counts as a copy of a training image (METHOD.md section 5)."""

PREPROCESSING = ("sscd", "wen")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray | str | Path
"""A PIL image, an (H, W, 3) array (floats in [0, 1] as a pipeline's `output_type="np"`, or uint8), or a file."""


def to_pil(image: ImageLike) -> Image.Image:
    """`image` as an RGB PIL image; float arrays in [0, 1] are rounded to 8 bits as a pipeline's PIL output is."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {image}: {exc}") from None
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, the longer one scaled and truncated to an integer (torchvision's Resize(int))."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """The centred size x size window, offsets rounded as torchvision's CenterCrop rounds them."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def sscd_preprocess(image: ImageLike, preprocessing: str = "sscd") -> torch.Tensor:
    """One image as the (3, H, W) float tensor an SSCD model reads (see the module docstring)."""
    if preprocessing not in PREPROCESSING:
        raise InputError(f"SSCD preprocessing must be one of {', '.join(PREPROCESSING)}, not {preprocessing!r}")
    img = to_pil(image)
    if preprocessing == "sscd":
        img = img.resize((288, 288), Image.Resampling.BILINEAR)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        img = _center_crop(_resize_shorter(img, 256), 224)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@dataclass
class SSCDModel:
    """A loaded SSCD descriptor model with the preprocessing its descriptors are computed with."""

    module: Any
    device: torch.device
    preprocessing: str = "sscd"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _device(device: str | torch.device | None) -> torch.device:
    from diffmem.models.loading import default_device

    return torch.device(device) if device is not None else default_device()


def load_sscd(path: str | Path, device: str | torch.device | None = None,
              preprocessing: str = "sscd") -> SSCDModel:
    """Load an SSCD TorchScript file; a missing file or one that is not TorchScript is one InputError line."""
    file = Path(path).expanduser()
    if preprocessing not in PREPROCESSING:
        raise InputError(f"SSCD preprocessing must be one of {', '.join(PREPROCESSING)}, not {preprocessing!r}")
    if not file.is_file():
        raise InputError(f"SSCD model file not found: {file} (get e.g. sscd_disc_mixup.torchscript.pt from "
                         "github.com/facebookresearch/sscd-copy-detection)")
    dev = _device(device)
    try:
        module = torch.jit.load(str(file), map_location=dev)
    except Exception as exc:  # torch raises RuntimeError, ValueError or pickle errors for foreign files
        raise InputError(f"{file} is not a TorchScript model (an SSCD *.torchscript.pt file): "
                         f"{_first_line(exc)}") from None
    return SSCDModel(module.eval(), dev, preprocessing)


@torch.no_grad()
def sscd_descriptors(model: SSCDModel, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
    """(N, D) L2-normalised SSCD descriptors of `images`, float32 on the CPU, `batch_size` images per call."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([sscd_preprocess(im, model.preprocessing) for im in images[start : start + batch_size]])
        desc = model.module(batch.to(model.device)).float()
        out.append(torch.nn.functional.normalize(desc, dim=1).cpu())
    if not out:
        raise InputError("no images to describe")
    return torch.cat(out)


def sscd_similarity(model: SSCDModel, generated: Sequence[ImageLike], references: Sequence[ImageLike],
                    batch_size: int = 32) -> torch.Tensor:
    """(N, M) SSCD cosine similarity of each generated image to each reference image."""
    return sscd_descriptors(model, generated, batch_size) @ sscd_descriptors(model, references, batch_size).T


@dataclass
class CLIPScorer:
    """A transformers CLIPModel and its processor, ready to score (image, caption) pairs."""

    model: Any
    processor: Any
    device: torch.device


def load_clip(source: str | Path, device: str | torch.device | None = None) -> CLIPScorer:
    """Load a CLIPModel and CLIPProcessor from a hub id or a local transformers folder (e.g. a LAION ViT-g/14 in
    transformers format); a missing folder or one holding another kind of model is one InputError line."""
    from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPProcessor

    name = str(source)
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise InputError(f"{path} is not a transformers model folder (no config.json); --clip takes a "
                             "CLIPModel folder or hub id")
        try:  # the reader primitive and the JSON rule: a device, FIFO or damaged file is no CLIP config
            kind = read_json_object(config_file, "model config").get("model_type")
        except InputError:
            kind = None
        if kind != "clip":
            raise InputError(f"{path} holds a {kind or 'unknown'} model, not a CLIPModel (model_type 'clip')")
    elif path.exists():
        raise InputError(f"{path} is a file, not a CLIPModel folder")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"CLIP model folder not found: {name} (give a CLIPModel folder or an owner/name hub id)")
    dev = _device(device)
    try:
        config = AutoConfig.from_pretrained(name)
        if not isinstance(config, CLIPConfig):
            raise InputError(f"{name} holds a {config.model_type} model, not a CLIPModel (model_type 'clip')")
        model: Any = CLIPModel.from_pretrained(name)
        model = model.to(dev).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"could not load CLIP model {name}: {_first_line(exc)}") from None
    return CLIPScorer(model, processor, dev)


@torch.no_grad()
def clip_score(clip: CLIPScorer, images: Sequence[ImageLike], captions: Sequence[str],
               batch_size: int = 32) -> torch.Tensor:
    """(N,) cosine similarity of image i's and caption i's CLIP embeddings (float32, CPU), in batches."""
    if len(images) != len(captions):
        raise InputError(f"{len(images)} images but {len(captions)} captions")
    out = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        inputs = clip.processor(text=list(captions[part]), images=[to_pil(im) for im in images[part]],
                                return_tensors="pt", padding=True, truncation=True)
        result = clip.model(**{k: v.to(clip.device) for k, v in inputs.items()})
        img = torch.nn.functional.normalize(result.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(result.text_embeds.float(), dim=-1)
        out.append((img * txt).sum(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
