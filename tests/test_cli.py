"""The `diffmem` CLI: detect on every prompt format, one-line user errors (exit 2), resume after kill -9,
evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.io.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "a blue ball", "portrait of a smiling old man, oil painting"]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def user_error(result, *fragments: str) -> str:
    """Check a run ended as a user error: exit 2, no traceback, last stderr line `error: ...`; return it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last
    return last


def test_help_on_every_command(cli: Callable) -> None:
    for command, option in (([], "detect"), (["detect"], "--prompts"), (["evaluate"], "--positives")):
        result = cli(*command, "--help")
        assert result.exit_code == 0 and option in result.stdout


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_detect_reads_every_format(fmt: str, tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    column: list[str] = []
    if fmt == "txt":
        path = write(tmp_path / "p.txt", "\n".join([PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2]]) + "\n")
    elif fmt == "jsonl":
        lines = [json.dumps({"caption": p, "id": i}) for i, p in enumerate(PROMPTS)]
        path = write(tmp_path / "p.jsonl", "\n".join([lines[0], "", *lines[1:]]) + "\n")
    elif fmt == "csv":
        path = write(tmp_path / "p.csv", "id,text\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
        column = ["--column", "text"]
    else:
        path = tmp_path / "p.parquet"
        pq.write_table(pa.table({"text": PROMPTS, "id": [0, 1, 2]}), path)
        column = ["--column", "text"]
    out = tmp_path / "out.jsonl"
    result = cli("detect", "--model", sd1_dir, "--prompts", path, "--out", out, *column)
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    expected = MagnitudeDetector(sd1_pipe).score(PROMPTS)
    assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], rel=1e-5)
    assert rows[0]["model"] == str(sd1_dir.resolve()) and rows[0]["steps"] == 1
    assert "scored 3 prompts" in result.stdout and str(out) in result.stdout
    if fmt in ("txt", "jsonl"):  # the blank lines are reported on one notice line
        notices = [line for line in result.stderr.splitlines() if line.startswith("notice: skipped")]
        assert len(notices) == 1 and "line 2" in notices[0]


def test_detect_passes_every_setting_to_the_detector(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli) -> None:
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    out = tmp_path / "out.jsonl"
    settings = ["--steps", "2", "--num-inference-steps", "4", "--generations", "2", "--seed", "5",
                "--guidance", "3.0", "--batch-size", "3", "--device", "cpu", "--dtype", "float32"]
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, *settings)
    assert result.exit_code == 0, result.output
    detector = MagnitudeDetector(sd1_pipe, steps=2, num_inference_steps=4, generations=2, seed=5,
                                 guidance_scale=3.0)
    for row, expected in zip(read_results(out), detector.score(PROMPTS), strict=True):
        assert row["magnitudes"] == [pytest.approx(g, rel=1e-5) for g in expected.magnitudes]
        settings = (row["generations"], row["seed"], row["guidance_scale"], row["num_inference_steps"])
        assert settings == (2, 5, 3.0, 4)


def test_detect_runs_the_anisotropy_peer(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli) -> None:
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    out = tmp_path / "out.jsonl"
    peer = ["--detector", "anisotropy", "--cosine-weight", "1.5", "--generations", "2"]
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, *peer)
    assert result.exit_code == 0, result.output
    expected = AnisotropyDetector(sd1_pipe, generations=2, cosine_weight=1.5).score(PROMPTS)
    rows = read_results(out)
    for row, want in zip(rows, expected, strict=True):
        assert (row["detector"], row["cosine_weight"]) == ("anisotropy", 1.5)
        assert row["score"] == pytest.approx(want.score, rel=1e-5)
        assert row["terms"] == [pytest.approx(c, rel=1e-4, abs=1e-6) for c in want.terms]
    wen = MagnitudeDetector(sd1_pipe, generations=2).score(PROMPTS)
    assert [r["score"] for r in rows] != pytest.approx([w.score for w in wen], rel=1e-3)  # not Wen's score
    other = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--generations", "2")
    user_error(other, "detector='anisotropy'", "detector='wen'")


def test_detect_runs_the_sharpness_peer(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli) -> None:
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    out = tmp_path / "out.jsonl"
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--detector", "sharpness")
    assert result.exit_code == 0, result.output
    expected = SharpnessDetector(sd1_pipe).score(PROMPTS)
    for row, want in zip(read_results(out), expected, strict=True):
        assert row["detector"] == "sharpness" and "cosine_weight" not in row
        assert row["score"] == pytest.approx(want.score, rel=1e-4) and row["terms"] == [row["score"]]


def test_truncated_prompt_warns_with_the_cut_words(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    long = " ".join(["cat"] * 75) + " dog bird fish"
    prompts = write(tmp_path / "p.txt", f"a cat\n{long}\n")
    out = tmp_path / "out.jsonl"
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and '"dog bird fish"' in warnings[0] and "78 tokens" in warnings[0]
    rows = read_results(out)
    assert [r["truncated"] for r in rows] == [False, True]
    assert rows[1]["truncated_text"].strip() == "dog bird fish"
    assert "1 truncated" in result.stdout


def test_rerun_resumes_and_refuses_other_settings(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    out = tmp_path / "out.jsonl"
    first = write(tmp_path / "first.txt", "\n".join(PROMPTS[:2]))
    assert cli("detect", "--model", sd1_dir, "--prompts", first, "--out", out).exit_code == 0
    before = out.read_text()
    every = write(tmp_path / "all.txt", "\n".join(PROMPTS + [PROMPTS[0]]))
    result = cli("detect", "--model", sd1_dir, "--prompts", every, "--out", out, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and "scored 1 prompts" in result.stdout
    assert "2 were already in the file" in result.stdout and "1 repeated" in result.stdout
    assert out.read_text().startswith(before)
    assert [r["prompt"] for r in read_results(out)] == PROMPTS

    changed = cli("detect", "--model", sd1_dir, "--prompts", every, "--out", out, "--seed", "1")
    user_error(changed, "seed=0", "seed=1")


def test_ctrl_c_keeps_the_finished_batches(
    tmp_path: Path, sd1_dir: Path, cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    score = MagnitudeDetector.score
    calls = []

    def interrupted_second_batch(self, prompts):
        calls.append(prompts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(self, prompts)

    monkeypatch.setattr(MagnitudeDetector, "score", interrupted_second_batch)
    prompts = write(tmp_path / "p.txt", "\n".join(PROMPTS))
    out = tmp_path / "out.jsonl"
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--batch-size", "2")
    user_error(result, "interrupted")
    assert [r["prompt"] for r in read_results(out)] == PROMPTS[:2]


@pytest.mark.parametrize(
    ("case", "args", "expected"),
    [
        ("empty file", ["--prompts", "empty.txt"], "holds no prompts"),
        ("blank lines only", ["--prompts", "blank.txt"], "holds no prompts"),
        ("undecodable bytes", ["--prompts", "latin1.txt"], "not valid UTF-8"),
        ("unknown column", ["--prompts", "p.csv", "--column", "nope"], "no column 'nope'"),
        ("missing prompt file", ["--prompts", "absent.txt"], "not found"),
        ("bad --steps", ["--prompts", "p.csv", "--steps", "some"], "--steps"),
        ("steps > T", ["--prompts", "p.csv", "--steps", "9", "--num-inference-steps", "5"], "between"),
        ("bad --device", ["--prompts", "p.csv", "--device", "toaster"], "--device"),
        ("anisotropy over steps", ["--prompts", "p.csv", "--detector", "anisotropy", "--steps", "all"], "--steps"),
        ("nan weight", ["--prompts", "p.csv", "--detector", "anisotropy", "--cosine-weight", "nan"], "finite"),
        ("unreadable model", ["--prompts", "p.csv", "--model", "no/such/folder"], "not found"),
    ],
)
def test_detect_user_errors(case: str, args: list[str], expected: str, tmp_path: Path, cli: Callable) -> None:
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.txt", "\n  \n\n")
    write(tmp_path / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    write(tmp_path / "p.csv", "prompt\na cat\n")
    resolved = [str(tmp_path / a) if a.endswith((".txt", ".csv")) else a for a in args]
    user_error(cli("detect", *resolved, "--out", tmp_path / "out.jsonl"), expected)


@pytest.mark.parametrize(
    "option", [["--generations", "0"], ["--dtype", "float64"], ["--batch-size", "x"], ["--detector", "carlini"]]
)
def test_bad_option_values_are_usage_errors(option: list[str], tmp_path: Path, cli: Callable) -> None:
    prompts = write(tmp_path / "p.txt", "a cat\n")
    result = cli("detect", "--prompts", prompts, "--out", tmp_path / "out.jsonl", *option)
    assert result.exit_code == 2 and "Traceback" not in result.output


def same_rows(a: list[dict], b: list[dict]) -> None:
    """Assert two result files hold the same rows: floats equal to float32 rounding, all else exactly."""
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k not in ("score", "magnitudes")} == {
            k: v for k, v in y.items() if k not in ("score", "magnitudes")
        }
        assert x["score"] == pytest.approx(y["score"], rel=1e-6)
        assert x["magnitudes"] == [pytest.approx(g, rel=1e-6) for g in y["magnitudes"]]


def test_kill_9_then_rerun_gives_the_uninterrupted_file(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    prompts = write(tmp_path / "p.txt", "".join(f"prompt number {i} of the resume test\n" for i in range(40)))
    args = ["detect", "--model", str(sd1_dir), "--prompts", str(prompts), "--batch-size", "2",
            "--steps", "all", "--num-inference-steps", "3"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from diffmem.cli import main; main()", *args, "--out", str(killed)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # only a guard against a hang; startup imports torch and diffusers
    try:
        while not (killed.exists() and b"\n" in killed.read_bytes()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no row appeared within 300 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_killed = killed.read_bytes().count(b"\n")
    assert 1 <= n_killed < 40

    resumed = cli(*args, "--out", killed)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr
    full = tmp_path / "full.jsonl"
    assert cli(*args, "--out", full).exit_code == 0
    same_rows(read_results(killed), read_results(full))
    assert len(read_results(full)) == 40


def scores_file(path: Path, scores: list[float | None], **settings: object) -> Path:
    """A result file holding `scores` (and `settings` on every row), as `diffmem detect` writes it."""
    rows = [{"prompt": f"{path.stem} {i}", "score": s, **settings} for i, s in enumerate(scores)]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_json_and_plots(tmp_path: Path, cli: Callable) -> None:
    pos = scores_file(tmp_path / "pos.jsonl", [5.0, 6.0, 7.0, 0.5])
    neg = scores_file(tmp_path / "neg.jsonl", [float(i) / 10 for i in range(20)] + [None])
    roc, hist = tmp_path / "roc.png", tmp_path / "hist.png"
    result = cli("evaluate", "--positives", pos, "--negatives", neg, "--json", "--plot", roc, "--hist", hist)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"auc", "tpr_at_1fpr", "tpr_at_3fpr", "threshold", "n_pos", "n_neg"} <= data.keys()
    assert data["auc"] == pytest.approx((3 * 20 + 5.5) / 80)  # 0.5 beats 0.0 .. 0.4 and ties 0.5
    assert data["tpr_at_1fpr"] == pytest.approx(0.75) and data["n_neg"] == 20 and data["n_dropped"] == 1
    assert 1.9 < data["threshold"] < 1.9 + 1e-9  # just above the largest negative
    for png in (roc, hist):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_table_states_the_convention(tmp_path: Path, cli: Callable) -> None:
    pos = scores_file(tmp_path / "pos.jsonl", [2.0, 3.0], model="a")
    neg = scores_file(tmp_path / "neg.jsonl", [0.0, 1.0], model="b")
    result = cli("evaluate", "--positives", pos, "--negatives", neg)
    assert result.exit_code == 0, result.output
    assert "AUC          1.0000" in result.stdout and "FPR <= target" in result.stdout
    assert "threshold" in result.stdout
    assert "different settings" in result.stderr and "model" in result.stderr


@pytest.mark.parametrize(
    ("negatives", "expected"),
    [("", "holds no result rows"), ('{"prompt": "x", "score": null}\n', "no non-memorized")],
    ids=["empty file", "no finite score"],
)
def test_evaluate_with_an_empty_group_fails(negatives: str, expected: str, tmp_path: Path, cli) -> None:
    pos = scores_file(tmp_path / "pos.jsonl", [1.0])
    neg = write(tmp_path / "neg.jsonl", negatives)
    user_error(cli("evaluate", "--positives", pos, "--negatives", neg), expected)
