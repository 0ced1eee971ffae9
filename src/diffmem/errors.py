"""Errors diffmem raises on bad input: the CLI prints their message on one line and exits with code 2."""


class DiffmemError(Exception):
    """A user-facing error: its message is one clear line, no traceback is needed to act on it."""


class ModelLoadError(DiffmemError):
    """The model could not be loaded as a Stable-Diffusion-family text-to-image pipeline."""


class InputError(DiffmemError):
    """A prompt file, result file or option value is unusable."""


class UnsupportedModelError(InputError):
    """A method cannot run on this model (e.g. it reads UNet cross-attention maps a transformer lacks), said in one
    line; `diffmem compare` shows such a method as n/a with that line."""
