"""Inference-time mitigation of memorization (METHOD.md section 3): Wen et al.'s embedding optimisation, the
baselines of Somepalli et al. 2023, and generation guarded by first-step detection.

The names below load lazily (like `diffmem`'s), so the CLI can read the defaults without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

DEFAULT_TARGET_LOSS = 3.0
"""Default `l_target`: the value of Wen et al.'s code for Stable Diffusion v1.4 (64x64x4 latents). `d_t` grows
like the square root of the latent size and depends on the model, so calibrate it per model, e.g. to a typical
(median) score of non-memorized prompts. Where every score is already below it (the testbed's are under 1), the
optimisation stops at once and changes nothing."""

METHODS = ("embedding", "rta", "rna", "cwr", "gni", "none")
"""Mitigation methods of `generate`: the embedding optimisation, the four baselines, and plain sampling."""

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
}

__all__ = sorted([*_EXPORTS, "DEFAULT_TARGET_LOSS", "METHODS"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffmem.mitigate' has no attribute {name!r}")
