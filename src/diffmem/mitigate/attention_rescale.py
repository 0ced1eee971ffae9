"""Ren et al.'s inference-time mitigation (ECCV 2024): pull cross-attention back to the beginning token.

As the authors' processor (github.com/renjie3/MemAttn, `--cross_attn_mask --miti_mem --c1 1.25`), in every
cross-attention layer at every step: the logits of the tokens after the prompt's end token (the padding, part of
the "summary" tokens) are masked out for both halves of the CFG batch, and the conditional rows' logit of the
beginning token is multiplied by `c1` before the softmax. Nothing else changes: same noise, same prompt, same
guidance. The processors are installed for the call and removed after it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffmem.errors import InputError
from diffmem.models.attention import AttentionHook, eos_positions

REN_C1 = 1.25
"""The authors' scale of the beginning token's logit."""


class AttentionRescale(AttentionHook):
    """Masks the tokens after the end token at `eos` (one position per prompt row of the conditional half, or one
    for every row) and scales the conditional rows' beginning-token logit by `c1`."""

    def __init__(self, eos: int, c1: float = REN_C1) -> None:
        super().__init__()
        if not math.isfinite(c1):
            raise InputError(f"--c1 must be a finite number, not {c1}")
        self.eos, self.c1 = eos, c1

    def edit(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.eos + 1 :] = -math.inf
        logits[logits.shape[0] // 2 :, :, :, 0] *= self.c1
        return logits


def rescaled_attention(pipe: Any, prompt: str, c1: float = REN_C1) -> AttentionRescale:
    """The hook that applies Ren et al.'s mitigation to a CFG call of `prompt` (use with `cross_attention`)."""
    return AttentionRescale(eos_positions(pipe.tokenizer, [prompt])[0], c1)
