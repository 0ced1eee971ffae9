"""The diffmem testbed: a tiny Stable-Diffusion-architecture model trained here that memorizes, with ground truth."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def weights_dir(base: bool = False) -> Path:
    """The shipped diffusers pipeline folder (`base=True`: the folder holding the stage-1 base UNet)."""
    return WEIGHTS / ("base_unet" if base else "pipeline")
