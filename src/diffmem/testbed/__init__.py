"""The diffmem testbeds: tiny Stable Diffusion (UNet) and SD3 (MMDiT) models trained here that memorize, with
ground truth."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
WEIGHTS_SD3 = Path(__file__).parent / "weights_sd3"


def weights_root(architecture: str = "unet") -> Path:
    """The folder of a testbed's weights, recipe and logs: `unet` (`testbed`) or `sd3` (`testbed-sd3`)."""
    return WEIGHTS_SD3 if architecture == "sd3" else WEIGHTS


def weights_dir(base: bool = False, architecture: str = "unet") -> Path:
    """A shipped testbed's diffusers pipeline folder (`base=True`: the folder holding its stage-1 base network)."""
    if architecture == "sd3":
        return WEIGHTS_SD3 / ("base_transformer" if base else "pipeline")
    return WEIGHTS / ("base_unet" if base else "pipeline")
