"""The shared row loop (`diffmem.runs.rows.run_rows`): resume, batching, input order, the data-parallel split and
its one-line errors, on a fake per-method part (no model). Two processes are simulated by two threads whose
accelerate collectives are replaced by in-memory ones; `test_generate_distributed.py` launches real ones."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from diffmem.errors import InputError
from diffmem.io.results import ResultWriter, read_results
from diffmem.runs.rows import QUIET_EXIT, OutputError, RowsRun, Work, run_rows

MATCH = {"model": "fake", "seed": 0}


def fake_work(calls: list[list[str]], fail: Callable[[list[str]], None] | None = None) -> Callable[[RowsRun], Work]:
    """A `load` whose work records each batch it gets, can fail on one (`fail` raises), and scores a prompt by
    its length."""

    def load(_: RowsRun) -> Work:
        def rows(prompts: list[str]) -> list[dict[str, Any]]:
            calls.append(list(prompts))
            if fail is not None:
                fail(prompts)
            return [{"prompt": p, "score": len(p), **MATCH} for p in prompts]

        return Work(rows, device="cpu", advice="lower --batch-size (4)")

    return load


def prompts_of(path: Path) -> list[str]:
    return [row["prompt"] for row in read_results(path)]


def test_batches_in_input_order_each_prompt_once(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    calls: list[list[str]] = []
    seen: list[tuple[int, int]] = []
    run = run_rows(out, lambda: ["a", "bb", "a", "ccc", "dd", "e"], MATCH, fake_work(calls), per_batch=2,
                   progress=lambda done, total: seen.append((done, total)))
    assert calls == [["a", "bb"], ["ccc", "dd"], ["e"]]
    assert prompts_of(out) == ["a", "bb", "ccc", "dd", "e"]
    assert [row["score"] for row in read_results(out)] == [1, 2, 3, 2, 1]
    assert (run.todo, run.resumed, run.distinct, run.per_process, run.where()) == (
        ["a", "bb", "ccc", "dd", "e"], 0, 5, [5], "")
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_resume_skips_the_prompts_already_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rows.jsonl"
    with ResultWriter(out) as writer:
        writer.write_many([{"prompt": "bb", "score": 2, **MATCH}])
    calls: list[list[str]] = []
    run = run_rows(out, lambda: ["a", "bb", "ccc"], MATCH, fake_work(calls), per_batch=5, verb="scored")
    assert calls == [["a", "ccc"]] and run.resumed == 1 and run.todo == ["a", "ccc"]
    assert prompts_of(out) == ["bb", "a", "ccc"]
    assert "resuming" in capsys.readouterr().err

    again: list[list[str]] = []
    run = run_rows(out, lambda: ["a", "bb", "ccc"], MATCH, fake_work(again))
    assert again == [] and run.todo == [] and run.per_process == []  # nothing pending: the model is not loaded

    with pytest.raises(InputError, match="seed=0"):  # other settings are not resumed into
        run_rows(out, lambda: ["a"], {**MATCH, "seed": 1}, fake_work([]))


def failing_on(prompt: str, error: BaseException) -> Callable[[list[str]], None]:
    def fail(prompts: list[str]) -> None:
        if prompt in prompts:
            raise error

    return fail


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InputError("--guidance must be above 1"), "^--guidance must be above 1$"),
        (OutputError("cannot write x.png: File too large"),
         "^cannot write x.png: File too large; the 2 prompts finished are kept, rerun to resume$"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), r"^out of memory on cpu: lower --batch-size \(4\)$"),
    ],
)
def test_an_error_in_a_batch_keeps_the_finished_rows(tmp_path: Path, error: Exception, expected: str) -> None:
    out = tmp_path / "rows.jsonl"
    with pytest.raises(InputError, match=expected):
        run_rows(out, lambda: ["a", "b", "c", "d"], MATCH, fake_work([], failing_on("c", error)), per_batch=2)
    assert prompts_of(out) == ["a", "b"]
    calls: list[list[str]] = []
    run_rows(out, lambda: ["a", "b", "c", "d"], MATCH, fake_work(calls), per_batch=2)  # the rerun resumes
    assert calls == [["c", "d"]] and prompts_of(out) == ["a", "b", "c", "d"]


def test_a_bug_in_a_batch_is_raised_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    with pytest.raises(ZeroDivisionError):
        run_rows(out, lambda: ["a", "b"], MATCH, fake_work([], failing_on("b", ZeroDivisionError())))
    assert prompts_of(out) == ["a"]


# ------------------------------------------------------------------------------------- two simulated processes


class Threads:
    """Two ranks as threads: a `PartialState` stand-in per rank and accelerate's collectives over shared memory."""

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=20)
        self.slots: list[Any] = [None] * n
        self.local = threading.local()

    def _exchange(self, value: Any) -> list[Any]:
        """Every rank's `value`, as copies (pickled, like the real collectives)."""
        self.slots[self.local.rank] = pickle.dumps(value)
        self.barrier.wait()
        everyone = [pickle.loads(data) for data in self.slots]
        self.barrier.wait()
        return everyone

    def gather_object(self, objects: list[Any]) -> list[Any]:
        return [item for part in self._exchange(objects) for item in part]

    def broadcast_object_list(self, objects: list[Any], from_process: int = 0) -> list[Any]:
        objects[:] = self._exchange(list(objects))[from_process]
        return objects

    def state(self, rank: int) -> Any:
        class State:
            num_processes = self.n
            process_index = rank
            is_main_process = rank == 0

            @staticmethod
            def main_process_first() -> Any:
                return nullcontext()

        return State()

    def run(self, body: Callable[[Any], Any]) -> list[Any]:
        """`body(state)` on every rank at once; returns each rank's result or the exception it raised."""
        results: list[Any] = [None] * self.n

        def start(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = body(self.state(rank))
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                results[rank] = exc

        threads = [threading.Thread(target=start, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Threads]:
    import accelerate.utils

    fake = Threads()
    monkeypatch.setattr(accelerate.utils, "gather_object", fake.gather_object)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake.broadcast_object_list)
    yield fake


PROMPTS = ["p0", "p1", "p2", "p3", "p4"]


def test_two_processes_split_every_global_batch_and_the_main_one_writes_in_order(
    tmp_path: Path, threads: Threads
) -> None:
    out = tmp_path / "rows.jsonl"
    calls: dict[int, list[list[str]]] = {0: [], 1: []}

    def body(state: Any) -> RowsRun:
        return run_rows(out, lambda: PROMPTS, MATCH, fake_work(calls[state.process_index]), per_batch=2, state=state)

    main, other = threads.run(body)
    assert isinstance(main, RowsRun) and isinstance(other, RowsRun), (main, other)
    # global batches of 2 x 2 prompts: rank 0 takes p0, p1 and p4, rank 1 takes p2 and p3
    assert calls == {0: [["p0", "p1"], ["p4"]], 1: [["p2", "p3"]]}
    assert main.per_process == other.per_process == [3, 2] and main.where() == " on 2 processes (3 + 2)"
    assert prompts_of(out) == PROMPTS


def test_a_user_error_on_one_process_keeps_the_rows_before_it_and_stops_every_process(
    tmp_path: Path, threads: Threads
) -> None:
    out = tmp_path / "rows.jsonl"

    def body(state: Any) -> RowsRun:
        fail = failing_on("p3", OutputError("cannot write p3.png: No space left on device"))
        return run_rows(out, lambda: PROMPTS + ["p5"], MATCH, fake_work([], fail), per_batch=1, state=state)

    main, other = threads.run(body)
    # batches (p0 | p1), (p2 | p3): rank 1 fails on p3, so p2 (rank 0, before it in input order) is still written
    assert isinstance(main, InputError) and str(main) == (
        "cannot write p3.png: No space left on device; the 3 prompts finished are kept, rerun to resume")
    assert isinstance(other, SystemExit) and other.code == QUIET_EXIT
    assert prompts_of(out) == ["p0", "p1", "p2"]


def test_an_unreadable_prompt_file_stops_every_process(tmp_path: Path, threads: Threads) -> None:
    def unreadable() -> list[str]:
        raise InputError("prompts.txt holds no prompts")

    main, other = threads.run(lambda state: run_rows(tmp_path / "rows.jsonl", unreadable, MATCH, fake_work([]),
                                                     state=state))
    assert isinstance(main, InputError) and "no prompts" in str(main)
    assert isinstance(other, SystemExit) and other.code == QUIET_EXIT
