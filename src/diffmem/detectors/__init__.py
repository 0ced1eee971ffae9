"""Memorization detectors in one harness (same noise, batching, rows, resume, data-parallel scans), one small
`Detector` class each: Wen et al.'s magnitude, the anisotropy and sharpness scores, Ren et al.'s attention
entropies, Bright Ending, NeMo's residual SSIM, the step-norm score and Carlini et al.'s generate-and-cluster
baseline. `DETECTORS` maps `--detector` names to them.

Importing the package imports every module in it, so a detector class joins `DETECTORS` by being defined in a new
module here: nothing else lists it (docs/extending/detector.md).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from diffmem.detectors.base import DETECTORS, Detector, DetectorConfig

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

from diffmem.detectors.anisotropy import AnisotropyDetector  # noqa: E402
from diffmem.detectors.attention_entropy import AttentionEntropyDetector, LayerEntropyDetector  # noqa: E402
from diffmem.detectors.bright_ending import BrightEndingDetector  # noqa: E402
from diffmem.detectors.carlini import CarliniDetector  # noqa: E402
from diffmem.detectors.magnitude import MagnitudeDetector  # noqa: E402
from diffmem.detectors.nemo import NemoDetector  # noqa: E402
from diffmem.detectors.sharpness import SharpnessDetector  # noqa: E402
from diffmem.detectors.step_norm import StableRange, StepNormDetector  # noqa: E402

__all__ = ["DETECTORS", "AnisotropyDetector", "AttentionEntropyDetector", "BrightEndingDetector", "CarliniDetector",
           "Detector", "DetectorConfig", "LayerEntropyDetector", "MagnitudeDetector", "NemoDetector",
           "SharpnessDetector", "StableRange", "StepNormDetector"]
