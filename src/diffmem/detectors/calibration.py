"""The detection threshold of a model, calibrated on reference (non-memorized) prompts at a target FPR (1%).

One function for every place that needs it (the page's startup calibration on the testbed, `diffmem testbed
mitigation`'s guard, the explanation check), so they all score the references the same way and apply the same rule
(`diffmem.measures.detection.calibrate_threshold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffmem.detectors.base import Detector
from diffmem.errors import InputError
from diffmem.measures.detection import calibrate_threshold, split_finite

REFERENCE_FPR = 0.01
"""The share of reference prompts a calibrated threshold may flag."""


@dataclass(frozen=True)
class Calibration:
    """A threshold (flag `score >= threshold`) and the finite reference scores it was calibrated on."""

    threshold: float
    fpr: float
    scores: tuple[float, ...]
    n_dropped: int = 0  # references without a finite score, left out

    @property
    def n(self) -> int:
        """How many reference scores the threshold rests on."""
        return len(self.scores)


def calibrate_detection(detector: Detector, references: Sequence[str], fpr: float = REFERENCE_FPR) -> Calibration:
    """Score `references` with `detector` (its settings are the threshold's) and calibrate the threshold that
    flags at most `fpr` of them; references without a finite score are left out and counted."""
    scores, dropped = split_finite([row.score for row in detector.score(list(references))], "reference")
    if scores.size == 0:
        raise InputError(f"none of the {len(references)} reference prompts has a finite score to calibrate on")
    return Calibration(calibrate_threshold(scores, fpr), fpr, tuple(float(s) for s in scores), dropped)
