"""Model loading: every kind of unusable model is one ModelLoadError line, and through the CLI exit 2."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from diffmem.errors import ModelLoadError
from diffmem.models.loading import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _missing(good: Path, dest: Path) -> None:
    """Nothing at all at `dest`."""


def _no_index(good: Path, dest: Path) -> None:
    shutil.copytree(good, dest)
    (dest / "model_index.json").unlink()


def _not_text_to_image(good: Path, dest: Path) -> None:
    shutil.copytree(good, dest)

    def drop_unet(index: dict) -> None:
        index["_class_name"] = "AudioLDMPipeline"
        del index["unet"]

    _edit_json(dest / "model_index.json", drop_unet)


def _corrupt_weights(good: Path, dest: Path) -> None:
    shutil.copytree(good, dest)
    (dest / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 512)


def _guidance_distilled(good: Path, dest: Path) -> None:
    shutil.copytree(good, dest)
    _edit_json(dest / "unet" / "config.json", lambda cfg: cfg.update(time_cond_proj_dim=256))


BROKEN = {
    "missing folder": (_missing, "not found"),
    "no model_index.json": (_no_index, "model_index.json"),
    "not text-to-image": (_not_text_to_image, "missing unet"),
    "corrupt weights": (_corrupt_weights, "could not load"),
    "guidance-distilled": (_guidance_distilled, "guidance-distilled"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_unusable_model_is_one_line_error(case: str, sd1_dir: Path, tmp_path: Path, cli: Callable) -> None:
    make, expected = BROKEN[case]
    folder = tmp_path / "model"
    make(sd1_dir, folder)

    with pytest.raises(ModelLoadError) as info:
        load_pipeline(folder, device="cpu")
    message = str(info.value)
    assert expected in message and "\n" not in message

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = cli("detect", "--model", folder, "--prompts", prompts, "--out", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.output

