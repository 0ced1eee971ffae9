"""A model's own defaults (its folder's diffmem.json, else its family's) reach every command unless overridden."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffmem.models.loading import (
    default_guidance,
    load_pipeline,
    model_guidance,
    read_model_defaults,
    resolve_guidance,
)


@pytest.fixture(scope="module")
def own_guidance_dir(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD folder with a diffmem.json naming guidance 2.5."""
    folder = tmp_path_factory.mktemp("own") / "model"
    shutil.copytree(model_dirs["sd1"], folder)
    (folder / "diffmem.json").write_text(json.dumps({"guidance_scale": 2.5}))
    return folder


def test_family_defaults_without_a_file(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    assert read_model_defaults(model_dirs["sd1"]) == {"guidance_scale": 7.5}
    assert model_guidance(str(model_dirs["sd1"])) == 7.5
    assert default_guidance(load_pipeline(model_dirs["sd1"], device="cpu")) == 7.5
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert read_model_defaults(xl) == {"guidance_scale": 5.0}  # diffusers' SDXL default
    assert read_model_defaults("org/hub-model") == {}


def test_the_folder_file_wins_and_an_explicit_value_wins_over_it(own_guidance_dir: Path) -> None:
    pipe = load_pipeline(own_guidance_dir, device="cpu")
    assert default_guidance(pipe) == 2.5 and resolve_guidance(pipe, None) == 2.5
    assert resolve_guidance(pipe, 4.0) == 4.0
    assert model_guidance(str(own_guidance_dir)) == 2.5 and model_guidance(str(own_guidance_dir), 6.0) == 6.0


def test_a_broken_defaults_file_is_a_one_line_error(own_guidance_dir: Path, tmp_path: Path, cli) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(own_guidance_dir, broken)
    (broken / "diffmem.json").write_text("{not json")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    res = cli("detect", "--model", str(broken), "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"))
    assert res.exit_code == 2 and "diffmem.json" in res.stderr and "Traceback" not in res.stderr


def test_detect_records_the_models_guidance(own_guidance_dir: Path, tmp_path: Path, cli) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "s.jsonl"
    res = cli("detect", "--model", str(own_guidance_dir), "--prompts", str(prompts), "--out", str(out))
    assert res.exit_code == 0, res.stderr
    assert json.loads(out.read_text().splitlines()[0])["guidance_scale"] == 2.5
    res = cli("detect", "--model", str(own_guidance_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
              "--guidance", "3")
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["guidance_scale"] == 3.0
