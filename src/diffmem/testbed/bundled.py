"""The models diffmem ships, known by name (registered by the package root): `testbed` and `testbed-base`."""

from __future__ import annotations

from diffmem.registry import NamedModel
from diffmem.testbed import weights_dir

TESTBED_NAMES = ("testbed", "testbed-base")
"""The bundled testbed's names: the memorizing fine-tune, and the same pipeline with its stage-1 base UNet."""

_MISSING = "run `diffmem testbed train`"


def testbed() -> NamedModel:
    """The bundled testbed pipeline (the memorizing fine-tune)."""
    return NamedModel(weights_dir(), missing=_MISSING)


def testbed_base() -> NamedModel:
    """The bundled testbed with its stage-1 base UNet swapped in."""
    return NamedModel(weights_dir(), unet=weights_dir(base=True), missing=_MISSING)
