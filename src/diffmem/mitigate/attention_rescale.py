"""Ren et al.'s inference-time mitigation (ECCV 2024): pull cross-attention back to the beginning token.

As the authors' processor (github.com/renjie3/MemAttn, `--cross_attn_mask --miti_mem --c1 1.25`), in every
cross-attention layer at every step: the logits of the tokens after the prompt's end token (the padding, part of
the "summary" tokens) are masked out for both halves of the CFG batch, and the conditional rows' logit of the
beginning token is multiplied by `c1` before the softmax. Nothing else changes: same noise, same prompt, same
guidance. The processors are installed for the call and removed after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diffmem.config import setting
from diffmem.mitigate.base import Mitigation, NoOptions, Outcome, Sampler
from diffmem.models.attention import AttentionHook, cross_attention, eos_positions
from diffmem.registry import NOT_VERIFIED

REN_C1 = 1.25
"""The authors' scale of the beginning token's logit."""


class AttentionRescale(AttentionHook):
    """Masks the tokens after the end token at `eos` (one position per prompt row of the conditional half, or one
    for every row) and scales the conditional rows' beginning-token logit by `c1`."""

    def __init__(self, eos: int, c1: float = REN_C1) -> None:
        super().__init__()
        self.eos, self.c1 = eos, c1

    def edit(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.eos + 1 :] = -math.inf
        logits[logits.shape[0] // 2 :, :, :, 0] *= self.c1
        return logits


def rescaled_attention(pipe: Any, prompt: str, c1: float = REN_C1) -> AttentionRescale:
    """The hook that applies Ren et al.'s mitigation to a CFG call of `prompt` (use with `cross_attention`).

    A memorized caption of the bundled testbed, generated with the re-scaling:

        >>> import torch
        >>> from diffmem import Monitor, load_pipeline
        >>> from diffmem.models.attention import cross_attention
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> prompt = shipped_recipe().splits().planted[0].caption  # a memorized caption of the testbed
        >>> with cross_attention(pipe.unet, rescaled_attention(pipe, prompt, c1=1.25)), Monitor(pipe) as monitor:
        ...     image = pipe(prompt, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
        >>> round(float(monitor.scores()[0]), 2)  # the first-step magnitude: 1.23 without the re-scaling
        1.01
    """
    return AttentionRescale(eos_positions(pipe.tokenizer, [prompt])[0], c1)


@dataclass(frozen=True)
class AttentionConfig(NoOptions):
    """Ren et al.'s option: the scale of the beginning token's logit."""

    c1: float = setting(REN_C1, option="--c1")


class AttentionMitigation(Mitigation):
    """Ren et al.'s mitigation: the same prompt and noise, cross-attention pulled back to the beginning token."""

    name = "attention"
    reads_unet = True
    Config = AttentionConfig
    config: AttentionConfig
    paper = "Ren et al., ECCV 2024"
    published = NOT_VERIFIED + ": Ren et al., ECCV 2024"
    cost = "none (one generation with re-scaled attention)"
    rank = 70

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        with cross_attention(self.pipe.unet, rescaled_attention(self.pipe, prompt, self.config.c1)):
            images, final = sampler(prompt=prompt)
        return Outcome(images, final, prompt, details={"c1": self.config.c1})
