"""Peer memorization detectors in `diffmem.detectors`'s harness (same noise, batching, rows, resume, data-parallel
scans), one small `Detector` class each: Ren et al.'s attention entropies, Bright Ending, NeMo's residual SSIM, the
step-norm score and Carlini et al.'s generate-and-cluster baseline. `DETECTORS` maps `--detector` names to them.
"""

from __future__ import annotations

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.attention_entropy import AttentionEntropyDetector, LayerEntropyDetector
from diffmem.detectors.bright_ending import BrightEndingDetector
from diffmem.detectors.carlini import CarliniDetector
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.nemo import NemoDetector
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.detectors.step_norm import StableRange, StepNormDetector

DETECTORS = {cls.name: cls for cls in (MagnitudeDetector, AnisotropyDetector, SharpnessDetector, LayerEntropyDetector,
                                       AttentionEntropyDetector, BrightEndingDetector, NemoDetector, StepNormDetector,
                                       CarliniDetector)}
"""Every detector by its `--detector` name."""

MIN_GENERATIONS = {NemoDetector.name: 2, CarliniDetector.name: 2}
"""Detectors that compare a prompt's generations with each other need at least this many."""

__all__ = ["DETECTORS", "MIN_GENERATIONS", "AttentionEntropyDetector", "BrightEndingDetector", "CarliniDetector",
           "LayerEntropyDetector", "NemoDetector", "StableRange", "StepNormDetector"]
