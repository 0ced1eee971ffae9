"""Ren et al. (ECCV 2024): memorized prompts spread their cross-attention over the prompt's tokens, where other
prompts put most of it on the beginning token, so the entropy of the attention over tokens is higher.

Both scores follow the authors' detect.py (github.com/renjie3/MemAttn). The attention of a layer is averaged over
heads and image positions (queries), which gives one distribution over the 77 text tokens per conditional row
(their `.mean(1)` of each saved map, then `.mean((2, 3))`); its entropy is `-sum p log p` over all 77 positions.
- LE (`ren-le`, the authors' mode "E"): that entropy in one layer at the first sampling step, layer 3 in forward
  order (down_blocks.1.attentions.1 of Stable Diffusion). One conditional denoiser call per prompt and generation.
- AE (`ren-ae`, mode "D"): the entropy of the average over every cross-attention layer, averaged over the last 10
  of 50 steps, plus the summary-token term: the same entropy restricted to the end token and the padding after it
  (not renormalised) averaged over those steps, minus its value at the first step. A whole generation.
With n generations the score is the mean over generations (the authors score one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.config import setting
from diffmem.detectors.base import Detector, DetectorConfig, GuidedConfig
from diffmem.detectors.trajectory import TrajectoryDetector
from diffmem.errors import InputError
from diffmem.models.attention import AttentionHook, cross_attention, entropy, eos_positions
from diffmem.models.conditioning import Conditioning
from diffmem.registry import NOT_VERIFIED

REN_LAYER = 3
"""The authors' layer for LE: index 3 of Stable Diffusion's 16 cross-attention layers in forward order."""
REN_LAST_STEPS = 10
"""AE averages the last 10 of the authors' 50 sampling steps (their steps 40..49); other schedules keep that last
fifth."""


class TokenAttention(AttentionHook):
    """Keeps, for the chosen UNet calls, each layer's attention over tokens averaged over heads and positions of
    the rows `rows` (the conditional half of a CFG batch, or all rows)."""

    def __init__(self, calls: set[int] | None = None, conditional_half: bool = True) -> None:
        super().__init__()
        self.wanted, self.conditional_half = calls, conditional_half
        self.maps: dict[int, dict[int, torch.Tensor]] = {}

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        if self.wanted is not None and self.call not in self.wanted:
            return
        rows = probs[probs.shape[0] // 2 :] if self.conditional_half else probs
        self.maps.setdefault(self.call, {})[layer] = rows.double().mean(dim=(1, 2))

    def layer_mean(self, call: int) -> torch.Tensor:
        """The token distribution of call `call` averaged over every recorded layer: (rows, tokens)."""
        return torch.stack(list(self.maps[call].values())).mean(dim=0)


@dataclass(frozen=True)
class LayerEntropyConfig(DetectorConfig):
    """LE's settings: the cross-attention layer read (forward order)."""

    layer: int = setting(REN_LAYER, option="layer", ge=0)


@dataclass(frozen=True)
class AttentionEntropyConfig(GuidedConfig):
    """AE's settings: how many of the last sampling steps are averaged (None: the authors' last fifth)."""

    last_steps: int | None = setting(None, option="last_steps", ge=1)

    def check(self) -> None:
        super().check()
        if self.n_last > self.num_inference_steps:
            raise InputError(f"last_steps must be between 1 and {self.num_inference_steps}, not {self.last_steps}")

    @property
    def n_last(self) -> int:
        """The number of last steps averaged."""
        if self.last_steps is None:
            return max(1, round(self.num_inference_steps * REN_LAST_STEPS / 50))
        return self.last_steps


class LayerEntropyDetector(Detector):
    """Ren et al.'s LE: the attention entropy of one cross-attention layer at the first step, on pure noise.

    `terms` holds each generation's entropy, `magnitudes` its `d_T` (free: the empty prompt's prediction is shared).

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = LayerEntropyDetector(pipe, layer=3)  # the authors' layer: down_blocks.1.attentions.1 in SD
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[0].caption])
        >>> round(memorized.score, 2), round(held_out.score, 2)  # entropy over the 77 tokens, in nats
        (3.2, 3.27)
    """

    name = "ren-le"
    reads_unet_attention = True
    Config = LayerEntropyConfig
    config: LayerEntropyConfig
    cost = "1 conditional evaluation per prompt and generation"
    paper = "Ren et al., ECCV 2024, arXiv 2403.11052"
    published = NOT_VERIFIED + ": Ren et al., ECCV 2024, arXiv 2403.11052"
    rank = 40

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        scheduler = self._schedule()
        noise, t = self._first_input(scheduler), scheduler.timesteps[0]
        self.denoiser.shared_uncond(noise, t)  # computed (once) outside the recording
        hook = TokenAttention(calls={0}, conditional_half=False)
        with cross_attention(self.pipe.unet, hook, layers=[self.config.layer]):
            eps_c, eps_u = self._eps_on_noise(noise, t, cond, scheduler)
        mags = (eps_c - eps_u).flatten(1).norm(dim=1).reshape(-1, self.config.generations, 1)
        (layer_map,) = hook.maps[0].values()
        terms = entropy(layer_map)
        return mags, [float(t)], terms.reshape(-1, self.config.generations)

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.mean(dim=1)


class AttentionEntropyDetector(TrajectoryDetector):
    """Ren et al.'s AE: attention entropy over the last steps of a generation plus the summary-token term.

    `terms` holds each generation's score, `magnitudes` its `d_t` at every step (read off the same CFG batches).

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> detector = AttentionEntropyDetector(pipe, num_inference_steps=10)  # one generation; the last 2 steps
        >>> memorized, held_out = detector.score([splits.planted[0].caption, splits.heldout[0].caption])
        >>> round(memorized.score, 2), round(held_out.score, 2), len(memorized.magnitudes[0])
        (4.76, 4.02, 10)
    """

    name = "ren-ae"
    reads_unet_attention = True
    Config = AttentionEntropyConfig
    config: AttentionEntropyConfig
    paper = "Ren et al., ECCV 2024, arXiv 2403.11052"
    published = NOT_VERIFIED + ": Ren et al., ECCV 2024, arXiv 2403.11052"
    rank = 50

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        steps = self.config.num_inference_steps
        last = list(range(steps - self.config.n_last, steps))
        hook = TokenAttention(calls={0, *last})
        _, monitor = self._generate(cond, hook=hook)
        eos = torch.tensor(eos_positions(self.pipe.tokenizer, self._prompts), dtype=torch.long)
        eos = eos.repeat_interleave(self.config.generations)
        summary = torch.arange(hook.layer_mean(0).shape[-1])[None, :] >= eos[:, None]

        def summary_entropy(call: int) -> torch.Tensor:
            return entropy(hook.layer_mean(call).cpu() * summary)

        late = torch.stack([entropy(hook.layer_mean(c)).cpu() for c in last]).mean(dim=0)
        padding = torch.stack([summary_entropy(c) for c in last]).mean(dim=0) - summary_entropy(0)
        mags = self._per_prompt(monitor.magnitudes())
        return mags, monitor.timesteps(), self._per_prompt(late + padding)

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.mean(dim=1)
