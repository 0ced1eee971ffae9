"""The mitigation frontier (`diffmem testbed mitigation`): its plan, strength checks, table and figure."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.errors import InputError
from diffmem.mitigate.base import MITIGATIONS
from diffmem.testbed.mitigation_eval import (
    SWEEPS,
    Parts,
    Point,
    check_strength,
    parse_methods,
    parse_strengths,
    plan,
    write_frontier,
)


def test_every_method_the_testbed_runs_has_a_strength_its_config_declares():
    """A method added to the registry without a sweep, or a sweep naming an option its Config lacks, fails here."""
    for method in parse_methods("all") or ():
        if MITIGATIONS[method].plain:
            assert method not in SWEEPS
            continue
        sweep = SWEEPS[method]
        assert sweep.option in MITIGATIONS[method].Config.names(), method
        assert 1.0 in sweep.factors and len(sweep.factors) >= 3, method  # the default and values around it


def test_plan_puts_every_default_first_then_held_out_then_the_sweeps():
    points = plan({"none": None, "rta": 4.0}, {"none": (), "rta": (1.0, 4.0, 8.0)})
    assert [p.key for p in points] == [
        "memorized-none", "memorized-rta-k-4", "heldout-none", "heldout-rta-k-4",
        "memorized-rta-k-1", "heldout-rta-k-1", "memorized-rta-k-8", "heldout-rta-k-8"]
    assert [p.default for p in points].count(True) == 4


@pytest.mark.parametrize(("given", "option"), [
    ("delayed-guidance=2", "--early-guidance"), ("rta=-1", "--k"), ("rta=1.5", "--k"), ("gni=-0.1", "--sigma"),
    ("initial-noise=2000", "--apply-cfg-step"), ("embedding=nan", "--target-loss"), ("none=1", "no strength"),
    ("rta", "METHOD=VALUE"), ("nonsense=1", "--strength"), ("rta=a,b", "comma-separated"),
])
def test_a_strength_out_of_range_is_one_error_line_before_any_model_loads(cli, monkeypatch, given, option):
    import diffmem.cli.testbed as command

    def never(*_a, **_k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(command, "_testbed_pipeline", never)
    res = cli("testbed", "mitigation", "--out", "unused", "--methods", "all", "--strength", given)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], lines
    res = cli("testbed", "mitigation", "--out", "unused", "--strength", "attention=2")  # not among the methods run
    assert res.exit_code == 2 and "not among --methods" in res.stderr


def test_check_strength_converts_through_the_methods_config():
    assert check_strength("initial-noise", 8.0) == 8.0 and check_strength("delayed-guidance", -2) == -2.0


def _row(set_: str, seconds: float, **values: float) -> dict:
    base = {"aligned": 0.9, "seconds_per_prompt": seconds}
    if set_ == "memorized":
        base |= {"memorization_rate": 0.5, "memorized_any_seed": 0.75, "mean_copy_similarity": 0.8}
    else:
        base |= {"copies_memorized": 0.0}
    return base | values


def test_the_table_is_written_from_the_parts_that_exist_and_lists_the_missing(tmp_path):
    """No model: rows stored by hand. Cost is a ratio to plain sampling of the same set (CPU seconds where both
    parts have them, else wall seconds); the target is judged against plain held-out alignment; parts not finished
    are listed by name; the figure is written."""
    parts = Parts(tmp_path, {"stamp": 1})
    points = plan({"none": None, "rta": 4.0}, {"rta": (4.0, 8.0)})
    stored = {"memorized-none": _row("memorized", 2.0, memorization_rate=0.8, aligned=0.95, cpu_seconds_per_prompt=1),
              "heldout-none": _row("heldout", 4.0, aligned=0.88),
              "memorized-rta-k-4": _row("memorized", 3.0, memorization_rate=0.05, aligned=0.86,
                                        cpu_seconds_per_prompt=1.2),
              "heldout-rta-k-4": _row("heldout", 4.0, aligned=0.7)}
    for key, row in stored.items():
        parts.row(key, lambda row=row: row)
    result = write_frontier(tmp_path, points, parts)
    assert result["missing_parts"] == ["memorized-rta-k-8", "heldout-rta-k-8"]
    rta = next(r for r in result["frontier"] if r["method"] == "rta" and r["strength"] == 4.0)
    assert rta["cost"] == 1.2 and rta["heldout_cost"] == 1.0 and rta["meets_target"] is True  # 86 >= 88 - 5
    later = next(r for r in result["frontier"] if r["strength"] == 8.0)
    assert later["meets_target"] is None and "memorization_rate" not in later
    table = (tmp_path / "frontier.md").read_text()
    assert "Plain held-out generations aligned: 88.0 %" in table
    assert "| rta | k 4 (default) | 5.0 % | 75.0 % | 86.0 % | 70.0 % | 0.0 % | 1.20x / 1.00x | yes |" in table
    assert "Finished parts: 4 of 6." in table and "Missing parts: memorized-rta-k-8, heldout-rta-k-8." in table
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "frontier.json").read_text()) == result


def test_a_run_without_any_plain_part_still_reports(tmp_path):
    parts = Parts(tmp_path, {"stamp": 1})
    result = write_frontier(tmp_path, [Point("memorized", "none"), Point("heldout", "none")], parts)
    assert result["reference_heldout_aligned"] is None and len(result["missing_parts"]) == 2
    assert "not measured yet" in (tmp_path / "frontier.md").read_text()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda m, v: f"{m}={v}", st.sampled_from([*SWEEPS, "none", "nope", ""]),
              st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=6)),
                       max_size=4).map(",".join))), max_size=3))
def test_any_strength_text_is_checked_values_or_one_error_line(texts: list[str]) -> None:
    """Whatever a user types after --strength: finite values each method's Config accepts, or one InputError line."""
    try:
        parsed = parse_strengths(texts)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for method, values in parsed.items():
        for value in values:
            assert math.isfinite(value) and check_strength(method, value) == value
