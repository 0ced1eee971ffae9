"""diffmem: detect, explain and mitigate training-data memorization in text-to-image diffusion models."""

from diffmem.detect import MagnitudeDetector, PromptScore, detect
from diffmem.errors import DiffmemError, InputError, ModelLoadError
from diffmem.evaluate import calibrate_threshold, evaluate_scores, roc_auc, tpr_at_fpr
from diffmem.loading import load_pipeline
from diffmem.monitor import Monitor

__version__ = "0.1.0"

__all__ = [
    "DiffmemError",
    "InputError",
    "MagnitudeDetector",
    "ModelLoadError",
    "Monitor",
    "PromptScore",
    "calibrate_threshold",
    "detect",
    "evaluate_scores",
    "load_pipeline",
    "roc_auc",
    "tpr_at_fpr",
]
