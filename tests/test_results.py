"""Result files: strict JSON, duplicates, repair of interrupted writes and resume after a real kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffmem.errors import InputError
from diffmem.io import results
from diffmem.io.results import ResultWriter, json_line, read_results


def strict_rows(path: Path) -> list[dict]:
    """Parse a result file as strict JSON Lines (NaN/Infinity rejected), requiring a final newline."""

    def reject(constant: str) -> None:
        raise AssertionError(f"invalid JSON constant {constant}")

    data = path.read_text(encoding="utf-8")
    assert data == "" or data.endswith("\n")
    return [json.loads(line, parse_constant=reject) for line in data.splitlines()]


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultWriter(path) as w:
        w.write({"prompt": "a", "score": math.nan, "per_seed": [1.0, math.inf, np.float32("nan")]})
        steps = np.array([-math.inf, 1.0])
        w.write({"prompt": "b", "score": np.float64(2.5), "n": np.int64(4), "steps": steps})
    assert strict_rows(path) == [
        {"prompt": "a", "score": None, "per_seed": [1.0, None, None]},
        {"prompt": "b", "score": 2.5, "n": 4, "steps": [None, 1.0]},
    ]
    assert json_line({"prompt": "line\nbreak", "x": -math.inf}) == '{"prompt": "line\\nbreak", "x": null}'
    assert [r["score"] for r in read_results(path)] == [None, 2.5]  # null scores are returned for counting


def test_duplicates_are_written_once_and_pending_keeps_input_order(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultWriter(path) as w:
        assert w.write({"prompt": "b", "score": 1.0}) is True
        assert w.write({"prompt": "b", "score": 9.0}) is False
        assert w.pending(["a", "b", "c", "a", "d", "c"]) == ["a", "c", "d"]
        batch = [{"prompt": "a", "score": 2.0}, {"prompt": "a", "score": 3.0}, {"prompt": "c", "score": 4.0}]
        assert w.write_many(batch) == 2
        assert "a" in w and len(w) == 3 and w.done == {"a", "b", "c"}
    assert [(r["prompt"], r["score"]) for r in strict_rows(path)] == [("b", 1.0), ("a", 2.0), ("c", 4.0)]
    with ResultWriter(path) as w:
        assert w.n_existing == 3 and w.repaired is None
        records = [{"prompt": p} for p in "abxcy"]
        assert w.pending(records, key=lambda r: r["prompt"]) == [{"prompt": "x"}, {"prompt": "y"}]


def test_custom_key_allows_repeated_prompts(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    key = lambda row: (row["line"], row["prompt"])  # noqa: E731
    with ResultWriter(path, key=key) as w:
        w.write_many([{"line": 1, "prompt": "x"}, {"line": 2, "prompt": "x"}])
    with ResultWriter(path, key=key) as w:
        assert w.done == {(1, "x"), (2, "x")}


def scan(path: Path, prompts: list[str]) -> None:
    """A scan as the CLI runs it: score the pending prompts in order, writing each row as it is scored."""
    with ResultWriter(path) as w:
        for p in w.pending(prompts):
            w.write({"prompt": p, "score": len(p) / 3})


def test_partial_last_line_is_removed_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    prompts = ["alpha", "beta", "gamma", "beta", "delta", "epsilon"]
    reference = tmp_path / "reference.jsonl"
    scan(reference, prompts)
    path = tmp_path / "r.jsonl"
    scan(path, prompts[:2])
    with path.open("ab") as f:
        f.write(json_line({"prompt": "gamma", "score": 1.0}).encode()[:17])  # killed mid-write
    with pytest.raises(InputError, match="incomplete row"):
        read_results(path)
    assert [r["prompt"] for r in read_results(path, allow_partial=True)] == ["alpha", "beta"]
    with ResultWriter(path) as w:
        assert w.repaired is not None and "incomplete" in w.repaired
        assert w.done == {"alpha", "beta"} and w.n_existing == 2
    assert path.read_bytes().endswith(b"\n")
    scan(path, prompts)
    assert path.read_bytes() == reference.read_bytes()


def test_complete_row_without_final_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "score": 1}\n{"prompt": "b", "score": 2}')
    with ResultWriter(path) as w:
        assert w.done == {"a", "b"} and w.repaired is not None
        w.write({"prompt": "c", "score": 3})
    assert [r["prompt"] for r in strict_rows(path)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a"}\n{"prompt": "b", oops}\n{"prompt": "c"}\n', "line 2 is not a JSON object"),
        ('{"prompt": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"prompt": "a"}\n\xff\n', "line 2 is not a JSON object"),
        ('{"prompt": "a"}\n{"score": 1}\n', "line 2 has no usable key"),
        ('{"prompt": "a"}\n{"prompt": ["b"]}\n', "line 2 has no usable key"),
        ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n', "line 3 repeats the key of line 1"),
    ],
)
def test_damaged_files_are_refused_not_dropped(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(content.encode("utf-8").replace("\xff".encode(), b"\xff"))
    before = path.read_bytes()
    with pytest.raises(InputError, match=expected) as info:
        ResultWriter(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before  # nothing is changed in a file that is refused


def test_settings_must_match_to_resume(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultWriter(path, match={"n": 4, "steps": "first"}) as w:
        w.write({"prompt": "a", "score": 1.0, "n": 4, "steps": "first"})
    with ResultWriter(path, match={"n": 4}) as w:
        assert w.done == {"a"}
    with pytest.raises(InputError, match="written with n=4, this run uses n=1"):
        ResultWriter(path, match={"n": 1})


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out" / "r.jsonl"  # the folder is created
    with ResultWriter(path), pytest.raises(InputError, match="in use by another scan"):
        ResultWriter(path)
    ResultWriter(path).close()  # the lock is released on close


def test_read_results_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_results(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no result rows"):
        read_results(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="is a folder"):
        ResultWriter(tmp_path)


CHILD = """
import sys, time
from diffmem.io.prompts import read_prompts
from diffmem.io.results import ResultWriter

prompts, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
with ResultWriter(out) as w:
    for p in w.pending(read_prompts(prompts)):
        i = int(p.split()[-1])
        w.write({"prompt": p, "score": float("nan") if i % 7 == 0 else i / 10, "pad": "x" * 20000})
        time.sleep(delay)
"""


def test_scan_killed_repeatedly_resumes_to_the_uninterrupted_file(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompts = [f"prompt {i}" for i in range(80)]
    prompts[50:50] = ["prompt 3", "prompt 10"]  # repeated prompts are scored once
    prompt_file.write_text("\n".join(prompts) + "\n")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(results.__file__).parents[1])}

    def run(out: Path, delay: float) -> subprocess.Popen:
        cmd = [sys.executable, str(child), str(prompt_file), str(out), str(delay)]
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)

    reference = tmp_path / "reference.jsonl"
    assert run(reference, 0).wait(timeout=60) == 0
    expected = strict_rows(reference)
    assert len(expected) == 80 and expected[0]["score"] is None
    size = reference.stat().st_size

    out = tmp_path / "out.jsonl"
    killed = 0
    for fraction in (0.2, 0.5, 0.8):
        proc = run(out, 0.0005)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.stat().st_size >= fraction * size:
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait(timeout=30) == -signal.SIGKILL
        kept = read_results(out, allow_partial=True)
        assert kept == expected[: len(kept)]  # complete rows only, a prefix of the uninterrupted file
        with ResultWriter(out) as w:
            assert w.done == {row["prompt"] for row in kept}
        assert strict_rows(out) == kept
    assert killed  # at least one scan really died mid-run (each one normally does)
    proc = run(out, 0)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert out.read_bytes() == reference.read_bytes()
