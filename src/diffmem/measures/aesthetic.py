"""The LAION aesthetic score: a linear head (LAION-AI/aesthetic-predictor, `sa_0_4_vit_l_14_linear.pth`) or an MLP
(christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`, the one MemBench uses) on
the L2-normalised CLIP ViT-L/14 image embedding.

Both files are plain state dicts, read with `torch.load(weights_only=True)` (no pickled code runs): `weight`/`bias`
for the linear head, `layers.{0,2,4,6,7}.weight`/`.bias` for the MLP, whose dropouts leave no weights and which has
no activations between its Linear layers, so either is a chain of Linear layers applied in key order. The image
embedding comes from a transformers CLIPModel (its projected pooled vision output, e.g.
openai/clip-vit-large-patch14).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmem.errors import InputError
from diffmem.measures.images import CLIPScorer, ImageLike, load_clip, to_pil

_LAYER = re.compile(r"^(?:layers\.)?(\d+)\.(weight|bias)$")


def _chain(state: dict[str, Any], file: Path) -> torch.nn.Sequential:
    """The Linear layers a predictor state dict describes, in order, with their weights."""
    if set(state) == {"weight", "bias"}:
        groups = {0: {"weight": state["weight"], "bias": state["bias"]}}
    else:
        groups = {}
        for key, value in state.items():
            match = _LAYER.match(key)
            if match is None:
                raise InputError(f"{file}: unexpected key {key!r}; expected an aesthetic predictor state dict "
                                 "('weight'/'bias', or 'layers.N.weight'/'layers.N.bias')")
            groups.setdefault(int(match[1]), {})[match[2]] = value
    layers: list[torch.nn.Linear] = []
    for index in sorted(groups):
        weight, bias = groups[index].get("weight"), groups[index].get("bias")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or bias is None:
            raise InputError(f"{file}: layer {index} is not a Linear layer (a 2-D weight and a bias)")
        if layers and layers[-1].out_features != weight.shape[1]:
            raise InputError(f"{file}: layer {index} takes {weight.shape[1]} inputs, the layer before gives "
                             f"{layers[-1].out_features}")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        layers.append(linear)
    if not layers or layers[-1].out_features != 1:
        raise InputError(f"{file}: an aesthetic predictor ends in one output, this one in "
                         f"{layers[-1].out_features if layers else 0}")
    return torch.nn.Sequential(*layers).eval()


def load_head(path: str | Path) -> torch.nn.Sequential:
    """The predictor head of a local file, read with weights_only=True; a missing or foreign file is one
    InputError line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"aesthetic predictor file not found: {file} (e.g. sac+logos+ava1-l14-linearMSE.pth from "
                         "github.com/christophschuhmann/improved-aesthetic-predictor)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many types for foreign or unsafe files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{file} is not a weights-only state dict of an aesthetic predictor: {first}") from None
    if not isinstance(state, dict):
        raise InputError(f"{file} holds a {type(state).__name__}, not a state dict")
    return _chain(state, file)


@dataclass
class AestheticPredictor:
    """A predictor head over a CLIP image encoder."""

    head: torch.nn.Sequential
    clip: CLIPScorer

    @property
    def input_size(self) -> int:
        """Width of the embeddings the head reads."""
        return _in_features(self.head)


def _in_features(head: torch.nn.Sequential) -> int:
    first = head[0]
    assert isinstance(first, torch.nn.Linear)
    return first.in_features


def load_aesthetic(path: str | Path, clip: str | Path = "openai/clip-vit-large-patch14",
                   device: str | torch.device | None = None) -> AestheticPredictor:
    """The head of `path` over the CLIPModel `clip` (a folder or hub id); their sizes must agree."""
    head = load_head(path)
    scorer = load_clip(clip, device)
    size = int(scorer.model.config.projection_dim)
    if size != _in_features(head):
        raise InputError(f"{path} reads {_in_features(head)}-wide embeddings but {clip} makes {size}-wide ones "
                         "(the LAION predictors need CLIP ViT-L/14: 768)")
    return AestheticPredictor(head.to(scorer.device), scorer)


@torch.no_grad()
def aesthetic_scores(predictor: AestheticPredictor, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
    """(N,) aesthetic score of each image (float32, CPU): the head on the L2-normalised CLIP image embedding."""
    out = []
    clip = predictor.clip
    for start in range(0, len(images), batch_size):
        pixels = clip.processor(images=[to_pil(im) for im in images[start : start + batch_size]],
                                return_tensors="pt")["pixel_values"]
        pooled = clip.model.vision_model(pixel_values=pixels.to(clip.device)).pooler_output
        emb = clip.model.visual_projection(pooled).float()  # CLIPModel.get_image_features, on any transformers
        emb = torch.nn.functional.normalize(emb, dim=-1)
        out.append(predictor.head(emb)[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0)
