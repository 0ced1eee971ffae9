"""`diffmem detect` and `diffmem mitigate` under `accelerate launch` with two CPU processes: data-parallel scans
(`diffmem.runs.rows`), rows in input order, resume and a user error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
pytestmark = pytest.mark.skipif(not Path(LAUNCHER).is_file(), reason="the accelerate launcher is not installed")

PROMPTS = [f"a photo of object number {i} in a garden" for i in range(7)]


def launch(*args: object, processes: int = 2) -> subprocess.CompletedProcess:
    """`diffmem ARGS` started by `accelerate launch` as `processes` gloo CPU processes (see DEVELOPERS.md)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [LAUNCHER, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "diffmem.cli",
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_score_like_one_and_write_in_input_order(sd1_dir, cli, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:5]) + "\n")
    common = ("detect", "--model", sd1_dir, "--prompts", prompts, "--generations", "2", "--batch-size", "4")
    proc = launch(*common, "--out", tmp_path / "two.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # global batches of 2 x 2 prompts: rank 0 scores prompts 0, 1 and 4, rank 1 scores 2 and 3
    assert "scored 5 prompts on 2 processes (3 + 2)" in proc.stdout
    assert cli(*common, "--out", tmp_path / "one.jsonl").exit_code == 0
    two, one = rows(tmp_path / "two.jsonl"), rows(tmp_path / "one.jsonl")
    assert [r["prompt"] for r in two] == PROMPTS[:5]
    for a, b in zip(two, one, strict=True):
        assert a["magnitudes"] == [pytest.approx(m, rel=1e-4) for m in b["magnitudes"]]

    prompts.write_text("\n".join(PROMPTS) + "\n")  # two more prompts: the parallel run resumes the file
    proc = launch(*common, "--out", tmp_path / "two.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 2 prompts on 2 processes (2 + 0)" in proc.stdout and "5 were already in the file" in proc.stdout
    assert [r["prompt"] for r in rows(tmp_path / "two.jsonl")] == PROMPTS


def test_a_user_error_ends_every_process_with_one_line(sd1_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "scores.jsonl"
    assert launch("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out).returncode == 0
    proc = launch("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--seed", "1")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "seed" in errors[0], proc.stderr[-3000:]
    assert len(rows(out)) == 2  # nothing written is lost


def test_mitigate_runs_data_parallel_like_one_process(sd1_dir, cli, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    common = ("mitigate", "--model", sd1_dir, "--prompts", prompts, "--method", "rta", "--k", "1",
              "--num-inference-steps", "2", "--generations", "2")
    two, one = tmp_path / "two", tmp_path / "one"
    proc = launch(*common, "--out", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # global batches of 2 x 1 prompts: rank 0 generates prompts 0 and 2, rank 1 prompt 1 (and saves its PNGs)
    assert "generated 3 prompts on 2 processes (2 + 1)" in proc.stdout
    assert cli(*common, "--out", one).exit_code == 0
    timing = ("seconds", "score", "final_loss")
    rows_two, rows_one = rows(two / "results.jsonl"), rows(one / "results.jsonl")
    assert [r["prompt"] for r in rows_two] == PROMPTS[:3] and [r["index"] for r in rows_two] == [0, 1, 2]
    for a, b in zip(rows_two, rows_one, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
        for name in a["images"]:
            pixels = [np.asarray(Image.open(folder / name), dtype=int) for folder in (two, one)]
            assert np.abs(pixels[0] - pixels[1]).max() <= 1

    prompts.write_text("\n".join(PROMPTS) + "\n")  # four more prompts: the parallel run resumes the folder
    proc = launch(*common, "--out", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 4 prompts on 2 processes (2 + 2)" in proc.stdout and "3 were already done" in proc.stdout
    assert [r["index"] for r in rows(two / "results.jsonl")] == list(range(len(PROMPTS)))
    assert len(list((two / "images").glob("*.png"))) == 2 * len(PROMPTS)
