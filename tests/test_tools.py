"""The maintainers' tools in tools/ that the docs' figures come from: their bookkeeping and their refusals."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmem.testbed import WEIGHTS
from diffmem.testbed.recipe import shipped_recipe, stage1_picks, stage2_picks

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_tool(name: str, *args: str) -> None:
    """Run tools/NAME as `python tools/NAME ARGS` does, in this process."""
    argv = sys.argv
    sys.argv = [str(TOOLS / name), *args]
    try:
        runpy.run_path(str(TOOLS / name), run_name="__main__")
    finally:
        sys.argv = argv


def shows(picks, steps: range, items: list[int]) -> float:
    """Mean number of times `items` are picked over `steps` (picks(step) gives indices)."""
    return float(np.mean([sum(int((picks(s) == k).sum()) for s in steps) for k in items]))


def test_copy_recency_counts_how_often_the_copied_items_were_shown(tmp_path, capsys) -> None:
    cfg = shipped_recipe()
    splits = cfg.splits()
    folder = tmp_path / "variant"
    (folder / "pipeline").mkdir(parents=True)
    recipe = json.loads((WEIGHTS / "recipe.json").read_text())
    recipe["stage2_runs"] = [{"set": {"stage2_batch": "44", "stage2_unique_rows": "0"}, "after": 3000, "steps": 40}]
    (folder / "recipe.json").write_text(json.dumps(recipe))
    copied = [3, 11, len(splits.stage1) + 5]  # two stage-1 renderings and a planted image
    (tmp_path / "q.json").write_text(json.dumps({"model": str(folder / "pipeline"),
                                                  "heldout_copied_training_items": copied}))
    run_tool("copy_recency.py", str(tmp_path / "q.json"))
    out = json.loads(capsys.readouterr().out)
    held = {i.caption for i in splits.heldout}
    assert (out["copied_items"], out["copied_stage1_items"]) == (3, 2)
    assert out["pool_items"] == sum(i.caption in held for i in splits.stage1)
    n1 = len(splits.stage1)
    assert out["stage 1"]["copied: mean shows"] == shows(stage1_picks(n1, cfg), range(cfg.stage1_steps), [3, 11])
    sizes = [len(splits.planted), len(splits.anchors), len(splits.stage2_unique), n1]
    lean = cfg.with_overrides(["stage2_batch=44", "stage2_unique_rows=0"])
    replay = lambda c: (lambda s: stage2_picks(sizes, c)(s)[3])  # noqa: E731
    assert out["continuation after 3000"]["copied: mean shows"] == shows(replay(lean), range(3000, 3040), [3, 11])
    assert out["shipped stage 2"]["copied: mean shows"] == shows(replay(cfg), range(cfg.stage2_steps), [3, 11])
    assert 0 < out["stage 1"]["pool: share shown"] <= 1


@pytest.mark.parametrize("text", ["{}", "[1, 2]", "not json", '{"heldout_copied_training_items": [1]'])
def test_copy_recency_refuses_what_is_not_a_quality_report(tmp_path, capsys, text: str) -> None:
    (tmp_path / "q.json").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        run_tool("copy_recency.py", str(tmp_path / "q.json"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--set", "stage2_batch=-1"], ["--set", "nonsense"], ["--init", "no/such/folder"],
                                  ["--steps", "0"]])
def test_stage2_variant_refuses_bad_settings_before_any_work(tmp_path, capsys, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_tool("testbed_stage2_variant.py", "--work", str(tmp_path / "w"), *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and not (tmp_path / "w").exists()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(copied=JSON | st.lists(st.integers(-5, 10**6), max_size=5), runs=JSON | st.lists(
    st.fixed_dictionaries({"set": st.dictionaries(st.sampled_from(["stage2_batch", "stage2_lr", "x"]), JSON,
                                                   max_size=2), "after": JSON, "steps": JSON}), max_size=2))
def test_copy_recency_reads_any_report_and_recipe_or_says_why_in_one_line(tmp_path, copied, runs) -> None:
    """Whatever quality.json and recipe.json hold, the tool's reader returns checked inputs or one DiffmemError."""
    from diffmem.errors import DiffmemError

    read_inputs = runpy.run_path(str(TOOLS / "copy_recency.py"))["read_inputs"]
    folder = tmp_path / "variant"
    (folder / "pipeline").mkdir(parents=True, exist_ok=True)
    recipe = json.loads((WEIGHTS / "recipe.json").read_text())
    (folder / "recipe.json").write_text(json.dumps({**recipe, "stage2_runs": runs}))
    (tmp_path / "q.json").write_text(json.dumps({"model": str(folder / "pipeline"),
                                                  "heldout_copied_training_items": copied}))
    try:
        cfg, items, chain, _ = read_inputs(tmp_path / "q.json")
    except DiffmemError as e:
        assert "\n" not in str(e)
        return
    assert all(type(k) is int and k >= 0 for k in items) and cfg == shipped_recipe()
    assert all(after >= 0 and steps >= 1 and run.stage2_replay_rows >= 0 for run, after, steps in chain)
