"""A model's own defaults (its folder's diffmem.json, else its family's) reach every command unless overridden."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.models.defaults import ModelDefaults
from diffmem.models.loading import load_pipeline


@pytest.fixture(scope="module")
def own_guidance_dir(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD folder with a diffmem.json naming guidance 2.5."""
    folder = tmp_path_factory.mktemp("own") / "model"
    shutil.copytree(model_dirs["sd1"], folder)
    (folder / "diffmem.json").write_text(json.dumps({"guidance_scale": 2.5}))
    return folder


def test_family_defaults_without_a_file(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    sd1 = ModelDefaults.from_folder(model_dirs["sd1"])
    assert sd1.guidance_scale == 7.5 and sd1.own == frozenset()
    assert ModelDefaults.for_model(str(model_dirs["sd1"])).resolve_guidance(None) == 7.5
    assert ModelDefaults.of(load_pipeline(model_dirs["sd1"], device="cpu")).guidance_scale == 7.5
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert ModelDefaults.from_folder(xl).guidance_scale == 5.0  # diffusers' SDXL default
    assert ModelDefaults.for_model("org/hub-model") == ModelDefaults()  # not downloaded: no family known


def test_the_folder_file_wins_and_an_explicit_value_wins_over_it(own_guidance_dir: Path) -> None:
    pipe = load_pipeline(own_guidance_dir, device="cpu")
    assert ModelDefaults.of(pipe).guidance_scale == 2.5 and ModelDefaults.of(pipe).resolve_guidance(None) == 2.5
    assert ModelDefaults.of(pipe).resolve_guidance(4.0) == 4.0
    on_disk = ModelDefaults.for_model(str(own_guidance_dir))
    assert on_disk.resolve_guidance(None) == 2.5 and on_disk.resolve_guidance(6.0) == 6.0


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


# ------------------------------------------------------------------------------------------- ModelDefaults


def test_the_configs_give_what_the_methods_need_to_know(model_dirs: dict[str, Path]) -> None:
    from diffmem.testbed.tiny import tiny_pipeline

    for kind, prediction in (("sd1", "epsilon"), ("sd2-v", "v_prediction")):
        folder = model_dirs[kind]
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        got = ModelDefaults.from_folder(folder)
        assert got.prediction_type == prediction and got.pipeline == "StableDiffusionPipeline"
        assert got.resolution == unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
        assert (got.scheduler, got.num_train_timesteps) == (sched["_class_name"], sched["num_train_timesteps"])
        # loading attaches the same; a pipeline built by hand derives the same from its in-memory configs
        assert ModelDefaults.of(load_pipeline(folder, device="cpu")) == got
        assert ModelDefaults.of(tiny_pipeline(kind)) == got


def test_published_defaults_fill_what_the_file_leaves_out(model_dirs: dict[str, Path], own_guidance_dir: Path,
                                                          tmp_path: Path) -> None:
    plain = ModelDefaults.from_folder(model_dirs["sd1"])
    assert (plain.target_loss, plain.sail_threshold, plain.detection_threshold) == (3.0, 8.2, None)
    assert not plain.own_target_loss and not plain.own_sail_threshold
    own = ModelDefaults.from_folder(own_guidance_dir)
    assert own.own == {"guidance_scale"} and own.target_loss == 3.0 and own.family_guidance == 7.5
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["sd1"], folder)
    (folder / "diffmem.json").write_text(json.dumps({"target_loss": 1, "sail_threshold": 4.5,
                                                     "detection_threshold": 0.9}))
    got = ModelDefaults.from_folder(folder)
    assert (got.target_loss, got.sail_threshold, got.detection_threshold) == (1.0, 4.5, 0.9)
    assert got.own_target_loss and got.own_sail_threshold and got.guidance_scale == 7.5
    assert got.resolve_target_loss(None) == 1.0 and got.resolve_target_loss(2) == 2.0
    assert got.resolve_sail_threshold(None) == 4.5 and got.resolve_detection_threshold(None) == 0.9
    assert isinstance(got.target_loss, float)


BAD = {
    "guidance not above 1": ("diffmem.json", {"guidance_scale": 1.0}, "guidance_scale"),
    "guidance a string": ("diffmem.json", {"guidance_scale": "3"}, "guidance_scale"),
    "target not finite": ("diffmem.json", {"target_loss": float("nan")}, "target_loss"),
    "target negative": ("diffmem.json", {"target_loss": -1}, "target_loss"),
    "sail threshold a bool": ("diffmem.json", {"sail_threshold": True}, "sail_threshold"),
    "detection threshold null": ("diffmem.json", {"detection_threshold": None}, "detection_threshold"),
    "unknown field": ("diffmem.json", {"target-loss": 2.0}, "target-loss"),
    "curve of one point": ("diffmem.json", {"transition_curve": [[981, 0.5]]}, "transition_curve"),
    "curve rising": ("diffmem.json", {"transition_curve": [[1, 0.5], [981, 0.6]]}, "transition_curve"),
    "prediction type": ("scheduler/scheduler_config.json", {"prediction_type": "flow"}, "prediction_type"),
    "timesteps": ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps"),
}


@pytest.mark.parametrize(("file", "values", "field"), BAD.values(), ids=BAD.keys())
def test_a_bad_value_is_one_line_naming_the_file_and_field(file: str, values: dict, field: str,
                                                           model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from diffmem.errors import ModelLoadError

    folder = tmp_path / "m"
    shutil.copytree(model_dirs["sd1"], folder)
    path = folder / file
    base = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**base, **values}))
    with pytest.raises(ModelLoadError) as info:
        ModelDefaults.for_model(str(folder))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and field in message


def test_a_broken_file_is_one_line(own_guidance_dir: Path, tmp_path: Path) -> None:
    from diffmem.errors import ModelLoadError

    folder = tmp_path / "m"
    shutil.copytree(own_guidance_dir, folder)
    (folder / "diffmem.json").write_text("[2.5]")
    with pytest.raises(ModelLoadError, match=r"diffmem\.json must hold a JSON object"):
        ModelDefaults.from_folder(folder)
    with pytest.raises(ModelLoadError, match=r"diffmem\.json must hold a JSON object"):
        load_pipeline(folder, device="cpu")  # loading reads it too, before the weights


def test_save_and_read_back(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["sd2-v"], folder)
    made = ModelDefaults.from_folder(folder).override(guidance_scale=3, target_loss=0.25, detection_threshold=1.5)
    assert made.own == {"guidance_scale", "target_loss", "detection_threshold"} and made.guidance_scale == 3.0
    path = made.save(folder)
    assert json.loads(path.read_text()) == {"guidance_scale": 3.0, "target_loss": 0.25, "detection_threshold": 1.5}
    assert ModelDefaults.from_folder(folder) == made
    assert ModelDefaults.of(load_pipeline(folder, device="cpu")) == made
    from diffmem.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="guidance_scale must be above 1"):
        made.override(guidance_scale=0.5)  # checked like a file's value
    with pytest.raises(TypeError, match="resolution"):
        made.override(resolution=64)  # only a model's own settings are saved


def test_serve_takes_the_models_own_detection_threshold() -> None:
    from diffmem.app.service import Threshold, threshold_from_options

    own = ModelDefaults().override(detection_threshold=1.25)
    got = threshold_from_options("/some/model", defaults=own)
    assert got is not None and got.value == 1.25 and "diffmem.json" in got.source
    given = threshold_from_options("/some/model", threshold=2.0, defaults=own)
    assert given == Threshold(2.0, "the --threshold option")
    assert threshold_from_options("testbed", defaults=ModelDefaults()) is None  # none of its own: calibrated


SCALARS = st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-2000, 2000) | st.text(max_size=3)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_any_transition_curve_is_read_or_refused_in_one_line(value: object) -> None:
    """Whatever diffmem.json holds as the curve: a checked tuple of falling (timestep, d_t) pairs whose
    interpolation is finite, or one ModelLoadError line naming the field."""
    from diffmem.errors import ModelLoadError

    try:
        got = ModelDefaults(transition_curve=value, own=frozenset({"transition_curve"}))  # type: ignore[arg-type]
    except ModelLoadError as exc:
        assert "transition_curve" in str(exc) and "\n" not in str(exc)
        return
    curve = got.transition_curve
    if curve is None:
        assert value is None
        return
    steps = [t for t, _ in curve]
    assert len(curve) >= 2 and all(a > b >= 0 for a, b in zip(steps, steps[1:], strict=False)) and steps[0] <= 1000
    assert all(math.isfinite(got.transition_threshold(t)) for t in (-5.0, 0.0, 500.0, 2000.0))
