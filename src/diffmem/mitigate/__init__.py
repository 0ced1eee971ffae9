"""Inference-time mitigation of memorization (METHOD.md section 3): Wen et al.'s embedding optimisation, the
baselines of Somepalli et al. 2023, and generation guarded by first-step detection.

The names below load lazily (like `diffmem`'s), so the CLI can read the defaults without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

DEFAULT_TARGET_LOSS = 3.0
"""`l_target` of a model that names none: the value of Wen et al.'s code for Stable Diffusion v1.4 (64x64x4
latents). `d_t` grows like the square root of the latent size and depends on the model, so a model should carry its
own, calibrated on its non-memorized prompts (the median first-step score: `target_loss` in its folder's
diffmem.json, or `negatives_median` of `diffmem evaluate --json`); where every score is already below it, the
optimisation stops at once and changes nothing."""

METHODS = ("embedding", "rta", "rna", "cwr", "gni", "none")
"""Mitigation methods of `generate`: the embedding optimisation, the four baselines, and plain sampling."""

PEER_METHODS = ("attention", "sail", "nemo")
"""Peer mitigations (`diffmem.mitigate.peers`): Ren et al.'s attention re-scaling, SAIL, NeMo."""

ALL_METHODS = METHODS + PEER_METHODS
"""Every method `generate` and `diffmem mitigate --method` accept."""

_EXPORTS = {
    "cwr": "diffmem.mitigate.baselines",
    "gni": "diffmem.mitigate.baselines",
    "rna": "diffmem.mitigate.baselines",
    "rta": "diffmem.mitigate.baselines",
    "EmbeddingResult": "diffmem.mitigate.embedding",
    "FirstStep": "diffmem.mitigate.embedding",
    "mitigate_embedding": "diffmem.mitigate.embedding",
    "Decision": "diffmem.mitigate.guard",
    "GuardResult": "diffmem.mitigate.guard",
    "generate": "diffmem.mitigate.guard",
    "guarded_generate": "diffmem.mitigate.guard",
    "iter_generate": "diffmem.mitigate.guard",
    "AttentionRescale": "diffmem.mitigate.attention_rescale",
    "NeuronStatistics": "diffmem.mitigate.nemo",
    "localize": "diffmem.mitigate.nemo",
}

__all__ = sorted([*_EXPORTS, "ALL_METHODS", "DEFAULT_TARGET_LOSS", "METHODS", "PEER_METHODS", "resolve_target_loss"])


def resolve_target_loss(pipe: Any, target_loss: float | None) -> float:
    """`target_loss` when given, else the model's own (`target_loss` in its diffmem.json, derived from its
    non-memorized prompts' scores), else `DEFAULT_TARGET_LOSS`."""
    if target_loss is not None:
        return float(target_loss)
    return float(getattr(pipe, "diffmem_defaults", {}).get("target_loss", DEFAULT_TARGET_LOSS))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffmem.mitigate' has no attribute {name!r}")
