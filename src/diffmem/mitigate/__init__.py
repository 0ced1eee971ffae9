"""Inference-time mitigation of memorization (METHOD.md section 3): Wen et al.'s embedding optimisation, the
baselines of Somepalli et al. 2023, and generation guarded by first-step detection.

The names below load lazily (like `diffmem`'s), so the CLI can read the method names without importing torch. A
model's target loss (`target_loss` of `diffmem.models.defaults.ModelDefaults`) is the embedding method's default.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

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

__all__ = sorted([*_EXPORTS, "ALL_METHODS", "METHODS", "PEER_METHODS"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffmem.mitigate' has no attribute {name!r}")
