"""The examples in the package's docstrings run (doctest), and every public entry point carries one.

Every module of `diffmem` is imported (pkgutil) and its doctests collected with `doctest.DocTestFinder`; each
docstring with examples is one test case, named by its object's qualified name, failing with doctest's report.
This file is the one place doctests run (not `--doctest-modules`, which would import the app and CLI modules its
own way). The examples run on the bundled testbed on the CPU, so their printed numbers are exact.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

import diffmem

SKIP_MODULES = {"diffmem.cli.__main__"}
"""Modules not to import: running `python -m diffmem.cli` starts the CLI."""

ENTRY_POINTS = (
    "diffmem.models.loading.load_pipeline",
    "diffmem.models.defaults.ModelDefaults",
    "diffmem.models.denoiser.Denoiser",
    "diffmem.detectors.magnitude.MagnitudeDetector",
    "diffmem.detectors.magnitude.detect",
    "diffmem.detectors.anisotropy.AnisotropyDetector",
    "diffmem.detectors.sharpness.SharpnessDetector",
    "diffmem.detectors.attention_entropy.LayerEntropyDetector",
    "diffmem.detectors.attention_entropy.AttentionEntropyDetector",
    "diffmem.detectors.bright_ending.BrightEndingDetector",
    "diffmem.detectors.nemo.NemoDetector",
    "diffmem.detectors.step_norm.StepNormDetector",
    "diffmem.detectors.carlini.CarliniDetector",
    "diffmem.detectors.monitor.Monitor",
    "diffmem.explanation.attribution.explain",
    "diffmem.explanation.attribution.suggest_edits",
    "diffmem.explanation.render.terminal_chart",
    "diffmem.explanation.render.png_chart",
    "diffmem.explanation.render.html_highlight",
    "diffmem.mitigate.guard.generate",
    "diffmem.mitigate.guard.guarded_generate",
    "diffmem.mitigate.guard.iter_generate",
    "diffmem.mitigate.embedding.mitigate_embedding",
    "diffmem.mitigate.baselines.rta",
    "diffmem.mitigate.baselines.rna",
    "diffmem.mitigate.baselines.cwr",
    "diffmem.mitigate.baselines.gni",
    "diffmem.mitigate.sail.sail",
    "diffmem.mitigate.nemo.localize",
    "diffmem.mitigate.attention_rescale.rescaled_attention",
    "diffmem.training.loop.train",
    "diffmem.training.loop.TrainConfig",
    "diffmem.training.finetune.finetune",
    "diffmem.training.finetune.calibrate",
    "diffmem.measures.detection.evaluate_scores",
    "diffmem.measures.detection.calibrate_threshold",
    "diffmem.io.prompts.read_prompts",
    "diffmem.io.results.ResultWriter",
)
"""The public entry points (issue #28): each shows its real use in a runnable example."""


def modules() -> list[ModuleType]:
    """Every module of the package, imported, in pkgutil's order."""
    names = ["diffmem"] + [m.name for m in pkgutil.walk_packages(diffmem.__path__, "diffmem.")]
    return [importlib.import_module(name) for name in names if name not in SKIP_MODULES]


def collect() -> list[doctest.DocTest]:
    """The docstrings with examples of every module (a module's own, its classes', functions' and methods')."""
    finder = doctest.DocTestFinder()
    return [test for module in modules() for test in finder.find(module) if test.examples]


DOCTESTS = collect()


def run(test: doctest.DocTest, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[doctest.TestResults, str,
                                                                                        list[str]]:
    """Run one docstring's examples on a copy of its module's names, in the empty `folder` (as the current folder
    and `tempfile`'s); doctest's results and report, and the files the examples left behind."""
    scratch, here = folder / "tmp", folder / "cwd"
    scratch.mkdir(parents=True)
    here.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where `tempfile.TemporaryDirectory()` creates
    monkeypatch.chdir(here)
    report = io.StringIO()
    fresh = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename, test.lineno, test.docstring)
    results = doctest.DocTestRunner(verbose=False).run(fresh, out=report.write)  # options: their own directives
    left = sorted(str(p.relative_to(folder)) for p in (*scratch.iterdir(), *here.iterdir()))
    return results, report.getvalue(), left


def test_the_package_has_examples() -> None:
    """The collection found the examples (an empty list would make the parametrized test pass vacuously)."""
    names = {test.name for test in DOCTESTS}
    assert "diffmem.config" in names
    assert len(DOCTESTS) >= len(ENTRY_POINTS)


@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_example(test: doctest.DocTest, one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples give their expected output and leave no file behind."""
    results, report, left = run(test, tmp_path, monkeypatch)
    assert results.attempted == len(test.examples)
    if results.failed:
        pytest.fail(f"{results.failed} of {results.attempted} examples failed in {test.name}:\n{report}",
                    pytrace=False)
    assert not left, f"the examples of {test.name} left {left} behind"


def _resolve(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_has_an_example(name: str) -> None:
    """The object's own docstring (a class's, not only its methods') holds at least one `>>>` example."""
    tests = doctest.DocTestFinder(recurse=False).find(_resolve(name), name)
    assert any(test.examples for test in tests), f"{name} has no example in its docstring"


@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_example_is_a_code_block_in_the_api_reference(test: doctest.DocTest) -> None:
    """The API reference renders docstrings as Markdown, where a `>>>` line at the text's margin is a quote: the
    examples are indented past the docstring's text (after `inspect.cleandoc`, as mkdocstrings reads it)."""
    at_margin = [line for line in inspect.cleandoc(test.docstring or "").splitlines() if line.startswith(">>>")]
    assert not at_margin, f"indent the examples of {test.name} four spaces past its text: {at_margin[0]!r}"


def _demo(source: str) -> doctest.DocTest:
    return doctest.DocTestParser().get_doctest(source, {}, "demo", "demo.py", 0)


def test_the_runner_reports_failures_and_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong expected output fails with doctest's own diff; directives apply; a file left behind is named."""
    results, report, _ = run(_demo(">>> 1 + 1\n3\n"), tmp_path / "wrong", monkeypatch)
    assert results.failed == 1
    assert "Expected:\n    3\nGot:\n    2" in report
    good = _demo(">>> list(range(20))  # doctest: +ELLIPSIS\n[0, 1, ..., 19]\n")
    assert run(good, tmp_path / "right", monkeypatch) == (doctest.TestResults(0, 1), "", [])
    litter = _demo(">>> import pathlib, tempfile\n>>> _ = tempfile.mkdtemp()\n>>> pathlib.Path('notes.txt').touch()\n")
    left = run(litter, tmp_path / "litter", monkeypatch)[2]
    assert left[0] == "cwd/notes.txt" and left[1].startswith("tmp/") and len(left) == 2
