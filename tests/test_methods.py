"""One registry per kind of method and one config per method (issue #28, items 2 and 6): a new method is one module,
every setting is checked once by its config (in range, or one `error:` line naming the option), and each option
name means one thing across commands (old spellings warn for a release)."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diffmem.detectors
import diffmem.mitigate
from diffmem.cli.common import renamed
from diffmem.config import MAX_GENERATIONS, MAX_SEED, Config
from diffmem.detectors import DETECTORS, Detector, MagnitudeDetector
from diffmem.detectors.magnitude import MagnitudeConfig
from diffmem.errors import InputError
from diffmem.mitigate import MITIGATIONS
from diffmem.mitigate.base import GenerationConfig, Mitigation

TOY = '''
from dataclasses import dataclass

import torch

from diffmem.config import setting
from diffmem.detectors.base import Detector, DetectorConfig
from diffmem.mitigate.base import Mitigation, NoOptions, Outcome


@dataclass(frozen=True)
class ToyConfig(DetectorConfig):
    scale: float = setting(1.0, option="--scale", gt=0)


class ToyDetector(Detector):
    name = "toy"
    Config = ToyConfig
    paper = "A. Toy, 2099"
    published = "AUC 0.5 (a coin)"
    cost = "nothing"

    def _measure(self, cond):
        mags = torch.full((len(cond), self.config.generations, 1), self.config.scale)
        return mags, [0.0], None

    def _combine(self, mags, terms):
        return mags.mean(dim=(1, 2))


class ToyMitigation(Mitigation):
    name = "toy-mitigation"
    paper = "A. Toy, 2099"

    def apply(self, prompt, sampler):
        images, score = sampler(prompt=prompt.upper())
        return Outcome(images, score, prompt.upper())
'''


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[object]:
    """A detector and a mitigation defined in a module of their own, outside the package: nothing else names them."""
    (tmp_path / "toy_methods.py").write_text(textwrap.dedent(TOY))
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("toy_methods")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toy_methods", None)
        DETECTORS.discard("toy")
        MITIGATIONS.discard("toy-mitigation")


def test_every_module_of_the_method_packages_is_imported_and_registered() -> None:
    for package in (diffmem.detectors, diffmem.mitigate):
        for module in pkgutil.iter_modules(package.__path__):
            assert f"{package.__name__}.{module.name}" in sys.modules
    assert list(DETECTORS) == ["wen", "anisotropy", "sharpness", "ren-le", "ren-ae", "bright-ending", "nemo",
                               "step-norm", "carlini"]
    assert list(MITIGATIONS)[:6] == ["embedding", "rta", "rna", "cwr", "gni", "none"]
    assert {"attention", "sail", "nemo"} <= set(MITIGATIONS)
    for name, cls in [*DETECTORS.items(), *MITIGATIONS.items()]:
        assert cls.name == name and issubclass(cls.Config, Config)
        assert cls.paper or getattr(cls, "plain", False), name
    assert [DETECTORS[n].min_generations for n in ("nemo", "carlini", "wen")] == [2, 2, 1]
    assert diffmem.mitigate.METHODS == ("embedding", "rta", "rna", "cwr", "gni", "none")


def test_a_name_is_taken_once_and_lookup_lists_the_known_ones() -> None:
    with pytest.raises(TypeError, match="'wen' is taken"):
        type("Impostor", (Detector,), {"name": "wen", "__module__": "elsewhere"})
    with pytest.raises(InputError, match=r"^--method must be one of embedding, rta, .*, not 'magic'$"):
        MITIGATIONS.lookup("magic", "--method")


def test_a_new_method_is_one_module(toy: object, tmp_path: Path, sd1_pipe, cli: Callable) -> None:
    from diffmem.runs.compare import CompareSettings

    assert DETECTORS["toy"] is toy.ToyDetector  # type: ignore[attr-defined]
    assert MITIGATIONS["toy-mitigation"] is toy.ToyMitigation  # type: ignore[attr-defined]
    listed = [json.loads(line) for line in cli("methods", "--json").stdout.splitlines()]
    mine = {row["name"]: row for row in listed}
    assert mine["toy"]["kind"] == "detector" and mine["toy"]["published"] == "AUC 0.5 (a coin)"
    assert "--scale" in mine["toy"]["options"] and mine["toy-mitigation"]["kind"] == "mitigation"
    assert "toy:" in cli("methods").stdout
    defaults = CompareSettings(model="testbed", memorized=tmp_path, normal=tmp_path, out=tmp_path / "c")
    assert "toy" in (defaults.detectors or ()) and "toy-mitigation" in (defaults.methods or ())
    scores = DETECTORS["toy"](sd1_pipe, scale=2.0, generations=3).score(["a cat"])
    assert scores[0].score == 2.0 and scores[0].magnitudes == [[2.0]] * 3
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "s.jsonl"
    assert cli("detect", "--model", "no/such/model", "--prompts", prompts, "--out", out, "--detector", "toy",
               "--steps", "all").stderr.strip().endswith("toy does not take it")


@pytest.mark.parametrize(("args", "fragment"), [
    (["detect", "--seed", "99999999999999999999999"], "--seed must be a whole number from 0 to"),
    (["detect", "--generations", "1000000000"], f"--generations must be at least 1 and at most {MAX_GENERATIONS}"),
    (["detect", "--guidance", "-5"], "--guidance must be a finite number"),
    (["detect", "--detector", "oracle"], "--detector must be one of wen, anisotropy"),
    (["detect", "--detector", "sharpness", "--guidance", "3"], "--guidance applies to the wen, ren-ae"),
    (["detect", "--seed", str(MAX_SEED), "--generations", "2"], "passes the largest seed"),
    (["mitigate", "--method", "gni", "--sigma", "inf"], "--sigma must be finite and 0 or more, not inf"),
    (["mitigate", "--method", "rta", "--k", "1000000000"], "--k must be a whole number from 0 to 75"),
    (["mitigate", "--method", "rta", "--lr", "nan"], "--lr must be a positive number, not nan"),
    (["mitigate", "--method", "none", "--generations", "1000000000"], "--generations must be at least 1"),
    (["mitigate", "--method", "sail", "--c1", "2"], "c1 do not apply to method 'sail'"),
    (["generate", "--seed", "99999999999999999999999"], "--seed must be a whole number from 0 to"),
    (["generate", "--steps", "2", "--num-inference-steps", "3"], "give --num-inference-steps only"),
])
def test_bad_values_are_one_error_line_before_the_model_loads(args: list[str], fragment: str, tmp_path: Path,
                                                               cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / ("s.jsonl" if args[0] == "detect" else "run")
    result = cli(*args, "--model", "testbed", "--prompts", prompts, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "loading" not in result.stderr and not out.exists()


def test_train_refuses_both_spellings(tmp_path: Path, cli: Callable) -> None:
    result = cli("train", "--model", "testbed-base", "--data", tmp_path, "--out", tmp_path / "run", "--steps", "1",
                 "--train-steps", "2")
    assert result.exit_code == 2 and "give --train-steps only (--steps is its deprecated spelling)" in result.stderr


def test_an_old_spelling_warns_once_and_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert renamed(None, None, "--old", "--new", 7) == 7 and renamed(3, None, "--old", "--new", 7) == 3
    assert capsys.readouterr().err == ""
    assert renamed(None, 5, "--old", "--new", 7) == 5
    assert capsys.readouterr().err.strip() == ("warning: --old is deprecated and will be removed in the next release; "
                                               "use --new")


def test_a_detector_takes_keywords_or_a_built_config(sd1_pipe) -> None:
    by_keywords = MagnitudeDetector(sd1_pipe, generations=2, steps="all", num_inference_steps=3)
    built = MagnitudeDetector(sd1_pipe, MagnitudeConfig(generations=2, steps="all", num_inference_steps=3))
    assert by_keywords.config == built.config and built.config.guidance_scale == 7.5  # the model's own, resolved
    assert (built.generations, built.n_steps) == (2, 3)
    assert MagnitudeDetector(sd1_pipe, built.config, generations=1).config.generations == 1
    with pytest.raises(TypeError, match="takes a MagnitudeConfig"):
        MagnitudeDetector(sd1_pipe, GenerationConfig())


def _plain_fields(cls: type[Config]) -> list[str]:
    from diffmem.config import _hints, _kind

    return sorted(name for name in cls.names() if _kind(_hints(cls)[name])[0] is not None or name == "steps")


CONFIGS = sorted({cls.Config for cls in [*DETECTORS.values(), *MITIGATIONS.values()]} | {GenerationConfig},
                 key=lambda c: c.__name__)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-3, max_value=80),
                   st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-2, max_value=60),
                   st.sampled_from(["first", "all", "3", "x", ""]), st.lists(st.integers(), max_size=2))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_registered_config_accepts_in_range_or_refuses_in_one_line(config: type[Config], data) -> None:
    values = {name: data.draw(VALUES, label=name) for name in _plain_fields(config)}
    try:
        built = config.from_values(values)
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and message.strip() == message and len(message) < 300
        return
    for name in _plain_fields(config):
        value = getattr(built, name)
        if name != "steps":
            assert config.check_value(name, value) == value  # every kept value is in its own range
        assert not (isinstance(value, float) and math.isnan(value))


def test_mitigations_build_their_options_and_refuse_others(sd1_pipe) -> None:
    sail = MITIGATIONS["sail"]
    assert sail.configure({"iters": 3, "k": 2}, {"sail_weight": 0.1}).to_dict()["iters"] == 3
    with pytest.raises(InputError, match="^c1 do not apply to method 'sail'$"):
        sail.configure({}, {"c1": 1.0})
    with pytest.raises(InputError, match="--k must be a whole number from 0 to 75"):
        sail.configure({"k": -1}, {})  # sail ignores --k, but no method could use -1
    made: Mitigation = MITIGATIONS["embedding"](sd1_pipe)
    assert made.config.to_dict()["target_loss"] is not None  # the model's own, resolved
