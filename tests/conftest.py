"""Shared fixtures: the tiny SD pipelines saved to a folder and loaded back as a user would, and a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The tiny models gain nothing from intra-op threads, and on a small shared CPU spinning threads make a 10 ms
# UNet call take over a second when another process is busy.
torch.set_num_threads(1)

KINDS = ("sd1", "sd2-v")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`tiny_pipeline(kind)` saved as diffusers folders, one per kind (epsilon and v-prediction)."""
    from diffmem.loading import quiet_diffusers
    from diffmem.tiny import tiny_pipeline

    quiet_diffusers()
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = root / kind
        tiny_pipeline(kind).save_pretrained(dirs[kind])
    return dirs


def _loaded(model_dirs: dict[str, Path], kind: str):
    """Load a saved tiny pipeline with `load_pipeline` and run it once (the first call warms kernels up)."""
    from diffmem.detect import MagnitudeDetector
    from diffmem.loading import load_pipeline

    pipe = load_pipeline(model_dirs[kind], device="cpu")
    MagnitudeDetector(pipe).score(["warm-up"])
    return pipe


@pytest.fixture(scope="session")
def sd1_pipe(model_dirs: dict[str, Path]):
    """The epsilon-prediction tiny pipeline, loaded from its folder."""
    return _loaded(model_dirs, "sd1")


@pytest.fixture(scope="session")
def sd2v_pipe(model_dirs: dict[str, Path]):
    """The v-prediction tiny pipeline, loaded from its folder."""
    return _loaded(model_dirs, "sd2-v")


@pytest.fixture(params=KINDS)
def pipe(request: pytest.FixtureRequest):
    """Each tiny pipeline in turn (tests using it run for both prediction types)."""
    return request.getfixturevalue({"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe"}[request.param])


@pytest.fixture(scope="session")
def sd1_dir(model_dirs: dict[str, Path]) -> Path:
    """Folder of the epsilon-prediction tiny pipeline, for `--model`."""
    return model_dirs["sd1"]


@pytest.fixture
def cli() -> Callable:
    """Run `diffmem ARGS...` in-process; returns click's Result (`exit_code`, `stdout`, `stderr`)."""
    from typer.testing import CliRunner

    from diffmem.cli import app

    runner = CliRunner()

    def run(*args: object):
        return runner.invoke(app, [str(a) for a in args])

    return run
