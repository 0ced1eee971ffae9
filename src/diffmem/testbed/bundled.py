"""The models diffmem ships, known by name (registered by the package root): `testbed`, `testbed-base` and
`testbed-sd3`."""

from __future__ import annotations

from pathlib import Path

from diffmem.registry import NamedModel
from diffmem.testbed import weights_dir

TESTBED_NAMES = ("testbed", "testbed-base", "testbed-sd3")
"""The bundled testbeds' names: the memorizing fine-tune, the same pipeline with its stage-1 base UNet, and the
SD3-architecture fine-tune. All three share one ground truth (`shipped_recipe().splits()`: the SD3 recipe draws
the same splits)."""

_MISSING = "run `diffmem testbed train`"


def testbed() -> NamedModel:
    """The bundled testbed pipeline (the memorizing fine-tune)."""
    return NamedModel(weights_dir(), missing=_MISSING)


def testbed_base() -> NamedModel:
    """The bundled testbed with its stage-1 base UNet swapped in."""
    return NamedModel(weights_dir(), unet=weights_dir(base=True), missing=_MISSING)


def testbed_sd3() -> NamedModel:
    """The bundled SD3-architecture testbed (MMDiT, rectified flow), trained on the same data."""
    return NamedModel(weights_dir(architecture="sd3"), missing="run `diffmem testbed train --architecture sd3`")


def write_example_data(folder: str | Path, n: int = 4, num_inference_steps: int = 10) -> Path:
    """A `diffmem train` data folder for examples: the testbed's own images of its first `n` planted captions
    (`i.png` beside `i.txt`), sampled in a few steps."""
    from diffmem.models.loading import load_pipeline
    from diffmem.testbed.recipe import shipped_recipe

    pipe, folder = load_pipeline("testbed", device="cpu"), Path(folder)
    for i, item in enumerate(shipped_recipe().splits().planted[:n]):
        pipe(item.caption, num_inference_steps=num_inference_steps).images[0].save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(item.caption)
    return folder
