"""Carlini et al. (USENIX Security 2023), the expensive baseline: generate many images of a prompt and look for a
tight cluster of near-identical ones; a memorized prompt keeps producing the same image.

Distance: the tiled l2 distance, the images cut into a 4x4 grid of tiles and the largest root-mean-square
difference over corresponding tiles (pixels in [0, 1]); the authors call two generations the same below 0.15
(`CARLINI_DELTA`) and a prompt memorized when a clique of 10 of its 500 generations is. As a score for ROC curves
diffmem takes the radius of the tightest cluster: for each generation the distance to its (k-1)-th nearest other
generation, k = min(`cluster_size`, n), and the prompt's score is minus the smallest of them (a ball around one
generation holding k generations; every pair in it is within twice that radius). `terms` holds each generation's
radius, `magnitudes` its `d_t` at every step (read off the same CFG batches). Cost: n whole generations, decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.config import generations_setting, setting
from diffmem.detectors.base import GuidedConfig
from diffmem.detectors.trajectory import TrajectoryDetector
from diffmem.models.conditioning import Conditioning

CARLINI_DELTA = 0.15
"""The authors' tiled-l2 threshold for "the same image"."""
CARLINI_CLUSTER = 10
"""The authors' clique size."""


def tiled_distance(images: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """(n, n) tiled l2 distance between images (n, H, W, 3) in [0, 1]: the largest tile RMS difference."""
    n, height, width = images.shape[:3]
    th, tw = height // grid, width // grid
    tiles = images[:, : th * grid, : tw * grid].double()
    tiles = tiles.reshape(n, grid, th, grid, tw, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
    diff = tiles[:, None] - tiles[None, :]  # (n, n, tiles, pixels)
    return diff.pow(2).mean(dim=-1).sqrt().amax(dim=-1)


def cluster_radius(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Per image, the distance to its (k-1)-th nearest other image (k >= 2)."""
    others = distances + torch.diag(torch.full((distances.shape[0],), float("inf"), dtype=distances.dtype))
    return others.sort(dim=1).values[:, k - 2]


@dataclass(frozen=True)
class CarliniConfig(GuidedConfig):
    """Carlini et al.'s settings: many generations per prompt and the size of the cluster looked for."""

    generations: int = generations_setting(16, 2, "carlini compares a prompt's generations with each other")
    cluster_size: int = setting(CARLINI_CLUSTER, option="cluster_size", ge=2)


class CarliniDetector(TrajectoryDetector):
    """Carlini et al.'s generate-and-cluster baseline: minus the tightest cluster radius of n generations.

    Two generations (the fewest it allows) of a memorized and a held-out caption of the bundled testbed:

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = CarliniDetector(pipe, generations=2, cluster_size=2, num_inference_steps=10)  # the fewest
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[0].caption])
        >>> memorized.score > held_out.score, -memorized.score < CARLINI_DELTA  # the two images are "the same"
        (True, True)
    """

    name = "carlini"
    Config = CarliniConfig
    config: CarliniConfig
    scores = "whole generations, decoded and compared"
    cost = "n whole generations per prompt, decoded"
    paper = "Carlini et al., USENIX Security 2023"
    published = "AUC 0.940, TPR@1% 0.232 (n=16; Carlini et al. 2023 re-run by Jeon et al., ICML 2025)"
    rank = 90

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        images, monitor = self._generate(cond, output_type="pt")
        images = images.permute(0, 2, 3, 1).float().cpu()
        k = min(self.config.cluster_size, self.config.generations)
        radii = torch.stack([cluster_radius(tiled_distance(group), k)
                             for group in images.reshape(-1, self.config.generations, *images.shape[1:])])
        return self._per_prompt(monitor.magnitudes()), monitor.timesteps(), radii

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return -terms.amin(dim=1)
