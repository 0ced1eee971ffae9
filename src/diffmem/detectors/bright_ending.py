"""Bright Ending (Chen et al., ICLR 2025): in a memorized generation the end token's cross-attention at the last
sampling step is bright exactly where the image copies its training image, so the text-conditional magnitude
is measured inside that region.

Per generation: the mask `m` is the end token's attention at the final step, averaged over heads and over the
highest-resolution cross-attention layers of the down blocks (the authors' `down_cross` maps at 64x64, Stable
Diffusion's latent resolution; upsampled bilinearly to the latent when it is coarser, as for SDXL). The score is the
mean over the scored steps of `||(eps_c - eps_u) * m||_2 / mean(m)` (m broadcast over channels), the local
magnitude normalised by the mask's area so that it stays in the units of Wen et al.'s `d_t`. Choices: the authors
get the mask from a first generation and the magnitudes from a second one of the same noise; the two trajectories
are the same, so diffmem keeps `eps_c - eps_u` of each step of one generation and applies the mask at its end
(one generation instead of two). The raw attention map is the mask (not min-max scaled; the normalisation by its
mean makes its scale irrelevant). Default: every step scored, as the authors track the whole trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffmem.config import setting
from diffmem.detectors.base import GuidedConfig, SteppedConfig
from diffmem.detectors.trajectory import TrajectoryDetector
from diffmem.models.attention import AttentionHook, cross_attention_names, eos_positions
from diffmem.models.conditioning import Conditioning
from diffmem.registry import NOT_VERIFIED


class EndTokenAttention(AttentionHook):
    """Keeps, at UNet call `call`, each layer's attention of the conditional rows over image positions for the
    token at `positions[row]` (the end token), averaged over heads: (rows, queries) per layer."""

    def __init__(self, call: int, positions: torch.Tensor) -> None:
        super().__init__()
        self.at, self.positions = call, positions
        self.maps: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        if self.call != self.at:
            return
        cond = probs[probs.shape[0] // 2 :].float().mean(dim=1)  # (rows, queries, tokens)
        index = self.positions.to(cond.device)[:, None, None].expand(-1, cond.shape[1], 1)
        self.maps[layer] = cond.gather(2, index)[..., 0]


def end_token_mask(maps: dict[int, torch.Tensor], names: list[str], latent: tuple[int, int]) -> torch.Tensor:
    """(rows, 1, H, W): the mean of the highest-resolution down-block maps, at the latent's size."""
    down = [i for i in maps if names[i].startswith("down_blocks")] or list(maps)
    finest = max(maps[i].shape[1] for i in down)
    mask = torch.stack([maps[i] for i in down if maps[i].shape[1] == finest]).mean(dim=0)
    height, width = latent
    factor = round((height * width / finest) ** 0.5)
    mask = mask.reshape(-1, 1, height // factor, width // factor)
    if factor != 1:
        mask = F.interpolate(mask, size=latent, mode="bilinear", align_corners=False)
    return mask


@dataclass(frozen=True)
class BrightEndingConfig(SteppedConfig, GuidedConfig):
    """Bright Ending's settings: a guided generation, scored over its leading `steps` (default: all)."""

    steps: str | int = setting("all", option="--steps")


class BrightEndingDetector(TrajectoryDetector):
    """Chen et al.'s Bright Ending score: `d_t` masked by the end token's final-step attention, over `steps`.

    `terms` holds each generation's masked score, `magnitudes` its unmasked `d_t` at the scored steps.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = BrightEndingDetector(pipe, steps="all", num_inference_steps=10)  # one generation
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[0].caption])
        >>> memorized.score > held_out.score, len(memorized.timesteps)
        (True, 10)
    """

    name = "bright-ending"
    reads_unet_attention = True
    Config = BrightEndingConfig
    config: BrightEndingConfig
    scores = "the leading --steps steps of a whole generation (default: all)"
    paper = "Chen et al., ICLR 2025, arXiv 2410.21665"
    published = NOT_VERIFIED + ": Chen et al., ICLR 2025, arXiv 2410.21665"
    rank = 60

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        eos = torch.tensor(eos_positions(self.pipe.tokenizer, self._prompts))
        eos = eos.repeat_interleave(self.config.generations)
        hook = EndTokenAttention(self.config.num_inference_steps - 1, eos)
        _, monitor = self._generate(cond, hook=hook, keep_differences=True)
        diffs = monitor.differences()[: self.config.n_steps]
        height, width = diffs[0].shape[-2:]
        mask = end_token_mask(hook.maps, cross_attention_names(self.pipe.unet), (int(height), int(width)))
        mask = mask.to(diffs[0].device)
        area = mask.flatten(1).mean(dim=1)
        masked = torch.stack([(d * mask).flatten(1).norm(dim=1) / area for d in diffs], dim=1)
        mags = self._per_prompt(monitor.magnitudes()[:, : self.config.n_steps])
        return mags, monitor.timesteps()[: self.config.n_steps], self._per_prompt(masked.mean(dim=1))

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.mean(dim=1)
