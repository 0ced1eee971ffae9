"""`kill -9` at random moments, then rerun: `detect`, `generate` and `train` end with exactly what an
uninterrupted run writes (rows, images, bit-identical weights), never a torn or duplicated row, and a second
process on the same output is refused while the first lives and let in once it died.

Slow (a few minutes: every kill restarts a process that imports torch): marked `kill`, run by `make kill-test`,
not by `make test`. Each command gets at least 10 kills at seeded moments: three at a random time while the
process starts, the rest after a random number of further units of work (rows, training steps) and a random delay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.kill

KILLS = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "33554432",
       "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def start(args: list[str]) -> subprocess.Popen:
    """`diffmem ARGS` as its own process (stderr kept for the refusal message)."""
    return subprocess.Popen([sys.executable, "-m", "diffmem.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def complete_lines(path: Path) -> tuple[list[dict], bytes]:
    """The newline-terminated JSON rows of a JSON Lines file and the bytes after the last newline."""
    data = path.read_bytes() if path.is_file() else b""
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], data[end:]


@dataclass
class Job:
    """A command under test: its arguments, how much of its work its output shows, and the check that its output
    after a kill is a clean prefix of the uninterrupted run's."""

    args: Callable[[Path], list[str]]  # the command line for an output location
    progress: Callable[[Path], int]  # units of work the output at that location holds
    check: Callable[[Path], None]  # after a kill: no torn or duplicated row, a prefix of the reference
    locked: Callable[[Path, int], bool]  # whether the process with this pid holds the output's lock
    total: int


@dataclass
class Report:
    """What the kills hit."""

    kills: int = 0
    while_starting: int = 0
    mid_work: int = 0
    torn_tails: int = 0
    progress_at_kills: list[int] = field(default_factory=list)


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 600) -> bool:
    """Poll until `condition()` or the process ends; whether the condition holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return condition()
        assert time.monotonic() < deadline, "no progress within the timeout"
        time.sleep(0.01)
    return True


def exercise(job: Job, out: Path, startup: float, seed: int, tail: Callable[[Path], bytes]) -> Report:
    """Lock check, then kills at seeded moments until at least KILLS landed (`startup`: seconds before the
    reference run's first unit of work), then a final run to the end."""
    rng = np.random.default_rng(seed)
    report = Report()
    # 1. A second process on the same output is refused while the first lives ...
    first = start(job.args(out))
    assert wait_for(first, lambda: job.locked(out, first.pid)), first.communicate()[1]
    second = start(job.args(out))
    _, err = second.communicate(timeout=600)
    assert second.returncode == 2 and "in use" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert first.poll() is None, "the first process should still be working"
    if "pid" in err:
        assert f"pid {first.pid}" in err
    first.send_signal(signal.SIGKILL)
    first.wait()
    job.check(out)
    # 2. ... and kills at random moments, each followed by a rerun that resumes.
    while report.kills < KILLS:
        done = job.progress(out)
        assert done < job.total, f"the work ended after only {report.kills} kills: give the job more work"
        proc = start(job.args(out))
        if report.kills % 4 == 1:  # kills 1, 5, 9: while it imports, loads the model, reads its inputs
            time.sleep(rng.uniform(0, startup))
            kind = "start"
        else:  # after a random share of the remaining work, at a random moment within a unit
            target = done + int(rng.integers(1, max(2, (job.total - done) // 3)))
            wait_for(proc, lambda target=target: job.progress(out) >= target)
            time.sleep(rng.uniform(0, 0.1))
            kind = "work"
        if proc.poll() is not None:  # finished before the kill: rerun the loop with less work left
            proc.communicate()
            assert proc.returncode == 0
            continue
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        report.kills += 1
        report.while_starting += kind == "start" and job.progress(out) == done
        report.mid_work += job.progress(out) > done
        report.torn_tails += bool(tail(out))
        report.progress_at_kills.append(job.progress(out))
        job.check(out)
    # 3. Allowed again after the last one died: the final run completes the work.
    final = start(job.args(out))
    _, err = final.communicate(timeout=900)
    assert final.returncode == 0, err
    print(f"\n{out.name}: {report}")
    return report


def reference_run(job: Job, out: Path) -> float:
    """Run to the end uninterrupted; returns the seconds until its first unit of work was written."""
    began = time.monotonic()
    proc = start(job.args(out))
    wait_for(proc, lambda: job.progress(out) >= 1)
    startup = time.monotonic() - began
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return startup


# --------------------------------------------------------------------------------------------------- detect

def test_detect_survives_kills(tmp_path: Path, sd1_dir: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} of the kill test, a {c} cube\n"
                               for i, c in enumerate(["red", "green", "blue"] * 50)))
    total = 150

    def args(out: Path) -> list[str]:
        return ["detect", "--model", str(sd1_dir), "--prompts", str(prompts), "--out", str(out), "--batch-size", "1",
                "--steps", "all", "--num-inference-steps", "6"]

    expected: list[dict] = []

    def check(out: Path) -> None:
        rows, _ = complete_lines(out)
        assert rows == expected[: len(rows)]  # whole rows, in order, none twice, as the uninterrupted run's

    job = Job(args, lambda out: len(complete_lines(out)[0]), check, lambda out, pid: out.exists(), total)
    ref = tmp_path / "reference.jsonl"
    startup = reference_run(job, ref)
    expected += complete_lines(ref)[0]
    assert len(expected) == total
    killed = tmp_path / "killed.jsonl"
    report = exercise(job, killed, startup, seed=1, tail=lambda out: complete_lines(out)[1])
    assert killed.read_bytes() == ref.read_bytes()
    assert report.kills >= KILLS and report.mid_work >= KILLS // 2


# ------------------------------------------------------------------------------------------------- generate

def _row_without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def test_generate_survives_kills(tmp_path: Path, sd1_dir: Path, sd1_pipe) -> None:
    from diffmem.detectors.magnitude import MagnitudeDetector

    texts = [f"a picture number {i} of a {c} ball" for i, c in enumerate(["red", "small", "striped"] * 60)]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n")
    scores = [s.score for s in MagnitudeDetector(sd1_pipe).score(texts)]
    threshold = float(np.median(scores))  # half the prompts take the mitigation path

    def args(out: Path) -> list[str]:
        return ["generate", "--model", str(sd1_dir), "--prompts", str(prompts), "--out", str(out),
                "--num-inference-steps", "8", "--guard", "--threshold", repr(threshold), "--iters", "2"]

    ref = tmp_path / "reference"
    expected: list[dict] = []

    def check(out: Path) -> None:
        rows, _ = complete_lines(out / "results.jsonl")
        assert [_row_without_timing(r) for r in rows] == [_row_without_timing(r) for r in expected[: len(rows)]]
        for row in rows:  # every image a row names is whole (the uninterrupted run's bytes)
            for name in row["images"]:
                assert (out / name).read_bytes() == (ref / name).read_bytes()

    job = Job(args, lambda out: len(complete_lines(out / "results.jsonl")[0]), check,
              lambda out, pid: (out / "results.jsonl").exists(), len(texts))
    startup = reference_run(job, ref)
    expected += complete_lines(ref / "results.jsonl")[0]
    assert len(expected) == len(texts) and 0 < sum(r["mitigated"] for r in expected) < len(texts)
    killed = tmp_path / "killed"
    report = exercise(job, killed, startup, seed=2, tail=lambda out: complete_lines(out / "results.jsonl")[1])
    check(killed)
    assert sorted(p.name for p in (killed / "images").iterdir()) == sorted(p.name for p in (ref / "images").iterdir())
    assert report.kills >= KILLS and report.mid_work >= KILLS // 2


# ---------------------------------------------------------------------------------------------------- train

def _log(out: Path) -> list[dict]:
    rows, _ = complete_lines(out / "log.jsonl")
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_train_survives_kills_with_bit_identical_weights(tmp_path: Path, sd1_dir: Path) -> None:
    from diffmem.training.loop import checkpoint_step

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"i{i}.png")
        (data / f"i{i}.txt").write_text(f"a picture number {i}")
    steps = 300

    def args(out: Path) -> list[str]:
        return ["train", "--model", str(sd1_dir), "--data", str(data), "--out", str(out), "--train-steps", str(steps),
                "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "3", "--log-every", "1", "--resume"]

    expected: list[dict] = []

    def check(out: Path) -> None:
        log = _log(out)
        assert log == expected[: len(log)]  # steps 1..k once each, the uninterrupted run's records
        assert checkpoint_step(out) <= len(log) or not log  # a whole checkpoint, readable

    def locked(out: Path, pid: int) -> bool:
        lock = out / "train.lock"
        return lock.is_file() and lock.read_text().strip() == str(pid)

    job = Job(args, lambda out: len(_log(out)), check, locked, steps)
    ref = tmp_path / "reference"
    startup = reference_run(job, ref)
    expected += _log(ref)
    assert [r["step"] for r in expected] == list(range(1, steps + 1))
    killed = tmp_path / "killed"
    report = exercise(job, killed, startup, seed=3, tail=lambda out: complete_lines(out / "log.jsonl")[1])
    assert _log(killed) == expected
    weights = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
    mine, theirs = load_file(str(killed / weights)), load_file(str(ref / weights))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert report.kills >= KILLS and report.mid_work >= KILLS // 2
