"""diffmem: detect, explain and mitigate training-data memorization in text-to-image diffusion models.

The top-level names are imported lazily, so `import diffmem.cli` (and `diffmem --help`) does not pay for
torch and diffusers, and the CLI can configure their logging before they load.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from diffmem.registry import register_model

__version__ = "0.1.0"

register_model("testbed", "diffmem.testbed.bundled:testbed")
register_model("testbed-base", "diffmem.testbed.bundled:testbed_base")
register_model("testbed-sd3", "diffmem.testbed.bundled:testbed_sd3")

_EXPORTS = {
    "AnisotropyDetector": "diffmem.detectors.anisotropy",
    "MagnitudeDetector": "diffmem.detectors.magnitude",
    "PromptScore": "diffmem.detectors.base",
    "detect": "diffmem.detectors.magnitude",
    "DiffmemError": "diffmem.errors",
    "InputError": "diffmem.errors",
    "ModelLoadError": "diffmem.errors",
    "calibrate_threshold": "diffmem.measures.detection",
    "evaluate_scores": "diffmem.measures.detection",
    "roc_auc": "diffmem.measures.detection",
    "tpr_at_fpr": "diffmem.measures.detection",
    "load_pipeline": "diffmem.models.loading",
    "NamedModel": "diffmem.registry",
    "register_model": "diffmem.registry",
    "Monitor": "diffmem.detectors.monitor",
    "explain": "diffmem.explanation.attribution",
    "suggest_edits": "diffmem.explanation.attribution",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
