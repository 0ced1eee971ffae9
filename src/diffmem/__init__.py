"""diffmem: detect, explain and mitigate training-data memorization in text-to-image diffusion models.

The top-level names are imported lazily, so `import diffmem.cli` (and `diffmem --help`) does not pay for
torch and diffusers, and the CLI can configure their logging before they load.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from diffmem.registry import register_model

__version__ = "0.1.0"

register_model("testbed", "diffmem.bundled:testbed")
register_model("testbed-base", "diffmem.bundled:testbed_base")

_EXPORTS = {
    "AnisotropyDetector": "diffmem.detect",
    "MagnitudeDetector": "diffmem.detect",
    "PromptScore": "diffmem.detect",
    "detect": "diffmem.detect",
    "DiffmemError": "diffmem.errors",
    "InputError": "diffmem.errors",
    "ModelLoadError": "diffmem.errors",
    "calibrate_threshold": "diffmem.evaluate",
    "evaluate_scores": "diffmem.evaluate",
    "roc_auc": "diffmem.evaluate",
    "tpr_at_fpr": "diffmem.evaluate",
    "load_pipeline": "diffmem.loading",
    "NamedModel": "diffmem.registry",
    "register_model": "diffmem.registry",
    "Monitor": "diffmem.monitor",
    "explain": "diffmem.explain",
    "suggest_edits": "diffmem.explain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
