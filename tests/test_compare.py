"""`diffmem compare` end to end with tiny settings: one complete table per stage, resumable, on a tiny pipeline
and on the testbed (there only the table's completeness is checked: the testbed's figures are not)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from diffmem.runs.compare import DEFAULT_DETECTORS, DEFAULT_METHODS, PUBLISHED

pytestmark = pytest.mark.usefixtures("one_thread")

NORMAL = ["a cat", "a dog on the grass", "portrait of a man", "a red car", "an oil painting of a boat"]


def check_complete(out: Path, detectors: tuple[str, ...], methods: tuple[str, ...], ns: tuple[int, ...]) -> dict:
    """Every detector has a row per n (measured, or n/a only where it needs more generations), every method a row
    with a time, and report.md shows them all."""
    report = json.loads((out / "report.json").read_text())
    rows = {(r["detector"], r["generations"]): r for r in report["detection"]}
    for name in detectors:
        for n in ns:
            row = rows[(name, n)]
            if name in ("nemo", "carlini") and n == 1:
                assert row["auc"] is None and "needs at least 2" in row["note"]
            else:
                assert 0 <= row["auc"] <= 1 and row["cost"] > 0 and row["tpr_at_1fpr"] is not None
    assert [r["method"] for r in report["mitigation"]] == list(methods)
    assert all(r["seconds_per_prompt"] > 0 for r in report["mitigation"])
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in detectors + methods)
    assert rows[("wen", 1)]["cost"] == pytest.approx(1.0)
    return report


def test_compare_tiny_pipeline_writes_both_tables_and_resumes(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    mem, normal = tmp_path / "mem.txt", tmp_path / "held.txt"
    mem.write_text("a red cube on a wooden table\na blue ball\n")
    normal.write_text("\n".join(NORMAL) + "\n")
    out = tmp_path / "cmp"
    args = ["compare", "--model", sd1_dir, "--memorized", mem, "--normal", normal, "--out", out,
            "--num-inference-steps", 3, "--generations", "1,2", "--mitigation-generations", 2]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = check_complete(out, DEFAULT_DETECTORS, DEFAULT_METHODS, (1, 2))
    assert set(report["calibration"]) == {"target_loss", "sail_threshold", "nemo_stats", "nemo_threshold"}
    assert (out / "step_norm_range.json").is_file() and (out / "nemo_stats.pt").is_file()
    step = next(r for r in report["detection"] if r["detector"] == "step-norm")
    assert step["n_normal"] == 2  # the odd-indexed half; the even half fit the range
    assert all(name in PUBLISHED for name in DEFAULT_DETECTORS)
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "scored 0 prompts" in again.stderr and "generating" not in again.stderr  # everything resumed
    bad = cli(*args[:-2], "--detectors", "wen,oracle")
    assert bad.exit_code == 2 and "unknown oracle" in bad.stderr and "Traceback" not in bad.output


def test_compare_on_the_testbed_writes_a_complete_table(tmp_path: Path, cli: Callable) -> None:
    mem, held = tmp_path / "mem.jsonl", tmp_path / "held.jsonl"
    for split, path, limit in (("memorized", mem, 2), ("heldout", held, 4)):
        assert cli("testbed", "prompts", "--split", split, "--out", path, "--limit", limit).exit_code == 0
    out = tmp_path / "cmp"
    detectors, methods = ("wen", "ren-le", "nemo", "step-norm"), ("none", "attention", "sail")
    result = cli("compare", "--model", "testbed", "--memorized", mem, "--normal", held, "--out", out,
                 "--num-inference-steps", 3, "--generations", "1,2", "--detectors", ",".join(detectors),
                 "--methods", ",".join(methods), "--mitigation-prompts", 1, "--mitigation-generations", 2)
    assert result.exit_code == 0, result.output
    report = check_complete(out, detectors, methods, (1, 2))
    assert report["measures"]["copy"] == "testbed copy similarity"
    assert all(r["memorization_rate"] is not None and r["alignment"] is not None for r in report["mitigation"])
