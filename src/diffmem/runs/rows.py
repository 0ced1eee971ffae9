"""One resumable, data-parallel loop from prompts to result rows, shared by every scan that writes a row per prompt:
`diffmem detect` (`diffmem.runs.detection`), `diffmem generate` / `diffmem mitigate` (`diffmem.runs.generation`)
and the scans of `reproduce` and `compare` (`diffmem.runs.reproduce.scan`).

`run_rows` owns what they share: reading the prompts and opening (resuming) the result file, loading the model only
when prompts are pending, batching, the data-parallel split, the progress bar, per-process counts and the one-line
errors (out of memory, a full disk). The per-method part is a `Work`: a batch of prompts -> one row each.

Data parallel (under `accelerate launch`, `state` a `PartialState` with several processes): the main process alone
reads the prompts and holds the result file; every process walks the same global batches of `num_processes` x
`per_batch` pending prompts, process r does the r-th slice, and the slices' rows are gathered in rank order, which
is input order, for the main process to write. Side outputs (images) are written by the process that made them,
before its rows are gathered, so a row in the file only names whole files; the processes must therefore share the
output folder (one machine, or a shared file system). A user error anywhere ends every process: the main one
raises it (the CLI prints one `error:` line), the others exit quietly with the same code.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from diffmem.console import progress_bar, say, stderr
from diffmem.errors import DiffmemError, InputError

Row = dict[str, Any]
Say = Callable[[str], None]
L = TypeVar("L")
S = TypeVar("S")

QUIET_EXIT = 2
"""Exit code of a process other than the main one when a user error ends the run (the CLI's code for user errors;
the main process reports the error)."""


class OutputError(InputError):
    """A batch's side output (an image) could not be written; `run_rows` adds how many finished prompts are kept."""


@dataclass
class Work:
    """The per-method part of a row run, made (on every process) once the model is loaded."""

    rows: Callable[[list[str]], list[Row]]
    """A batch of prompts -> one row per prompt, in order; it saves the batch's side outputs itself (raising
    `OutputError` when one cannot be written)."""
    device: Any = None
    """Where the work runs, named in the out-of-memory line."""
    advice: str = ""
    """What the out-of-memory line advises, e.g. "lower --batch-size (32)"."""


@dataclass
class RowsRun:
    """What a row run found and did; the same on every process."""

    prompts: list[str]
    """Every prompt read, in input order (repeats included)."""
    todo: list[str]
    """The prompts that were pending when the run began (each once, in input order): the ones it did."""
    resumed: int
    """Distinct prompts already in the result file."""
    per_process: list[int] = field(default_factory=list)
    """Prompts done by each process (empty when nothing was pending)."""

    @property
    def distinct(self) -> int:
        return self.resumed + len(self.todo)

    def where(self) -> str:
        """' on N processes (a + b ...)' for a summary line when several processes did the work, else ''."""
        if len(self.per_process) < 2:
            return ""
        return f" on {len(self.per_process)} processes ({' + '.join(map(str, self.per_process))})"


def _end_process_group() -> None:
    """Destroy this process's process group before the interpreter tears down: left to the interpreter, gloo's
    threads can be destroyed while joinable and the process aborts ("terminate called without an active
    exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_state(device: str | None) -> tuple[Any, Any]:
    """This process's accelerate `PartialState` and the torch device its work runs on: under `accelerate launch`
    with several processes the launcher's device (`--device` is then an error), else `--device` (None: default)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from diffmem.models.loading import parse_device

    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes > 1:
        atexit.register(_end_process_group)
        if device is not None:
            raise InputError("--device is chosen by `accelerate launch` when it starts several processes; leave it out")
        return state, state.device
    return state, parse_device(device)


def on_main(state: Any, fn: Callable[[], tuple[L, S]]) -> tuple[L | None, S]:
    """Run `fn() -> (local, shared)` on the main process only; the others get `(None, shared)`. An error there
    ends every process: the main one raises it, the others exit quietly with `QUIET_EXIT`."""
    if state is None or state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    local: L | None = None
    error: Exception | None = None
    payload: list[Any] = [None, False]  # [shared, failed]
    if state.is_main_process:
        try:
            local, payload[0] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told to stop
            error, payload[1] = exc, True
    broadcast_object_list(payload)
    if error is not None:
        raise error
    if payload[1]:
        raise SystemExit(QUIET_EXIT)
    return local, payload[0]


def run_rows(
    path: Path,
    prompts: Callable[[], Sequence[str]],
    match: Mapping[str, Any],
    load: Callable[[RowsRun], Work],
    *,
    per_batch: int = 1,
    state: Any = None,
    notices: bool = True,
    name: str | Path | None = None,
    verb: str = "done",
    loading: str | None = None,
    bar: str | None = None,
    check: Callable[[list[Row], Say], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RowsRun:
    """Write one row per distinct prompt into the result file `path`, resuming it; call it on every process.

    `prompts()` reads the prompts (main process only); `match` holds the settings every row records and a resumed
    file must share; `load(run)` loads the model and returns the `Work` (every process, only when prompts are
    pending; the main process first, under the `loading` spinner). `per_batch`: prompts per process per batch.
    `notices`: say on stderr that the file was repaired or is resumed ('resuming {name}: ... already {verb}').
    `bar`: the progress bar's label (None: no bar). On the main process, `check(rows, say)` sees each batch's rows
    before they are written (to count them or warn about one: `say` prints above the bar), and
    `progress(done, total)` follows each write (total: the distinct prompts, done: those in the file).
    """
    main = state is None or state.is_main_process
    with ExitStack() as stack:

        def open_file() -> tuple[Any, RowsRun]:
            from diffmem.io.results import ResultWriter

            items = list(prompts())
            writer = stack.enter_context(ResultWriter(path, match=match))
            if writer.repaired and notices:
                say(stderr, f"notice: {writer.path}: {writer.repaired}")
            todo = writer.pending(items)
            run = RowsRun(items, todo, len(set(items)) - len(todo))
            if run.resumed and notices:
                say(stderr, f"notice: resuming {name or path}: {run.resumed} of {run.distinct} prompts already {verb}")
            return writer, run

        writer, run = on_main(state, open_file)
        if run.todo:
            spinner = stderr.status(loading) if main and loading else nullcontext()
            with spinner, state.main_process_first() if state is not None else nullcontext():
                work = load(run)
            with progress_bar(len(run.todo), bar) if main and bar else nullcontext() as shown:
                tell: Say = (lambda line: say(shown.console, line)) if shown is not None else (
                    lambda line: say(stderr, line))
                _loop(run, work, writer, per_batch, state, tell, check, shown, progress)
    return run


@dataclass
class _Failure:
    """Why a process's batch failed, as every process learns it."""

    message: str
    rank: int
    output: bool = False
    """An `OutputError`: the main process adds how many finished prompts are kept."""


def _attempt(work: Work, prompts: list[str], rank: int) -> tuple[list[Row], _Failure | None, Exception | None]:
    """This process's rows of a batch, or why they could not be made (and the exception, to raise again)."""
    import torch

    if not prompts:
        return [], None, None
    try:
        return work.rows(prompts), None, None
    except torch.cuda.OutOfMemoryError as exc:
        return [], _Failure(f"out of memory on {work.device}: {work.advice}", rank), exc
    except DiffmemError as exc:
        return [], _Failure(str(exc), rank, isinstance(exc, OutputError)), exc
    except Exception as exc:  # noqa: BLE001 - a bug: raised again on its own process, reported by the main one
        return [], _Failure(f"process {rank} failed ({type(exc).__name__}: {exc}); see its traceback", rank), exc


def _loop(run: RowsRun, work: Work, writer: Any, per: int, state: Any, tell: Say,
          check: Callable[[list[Row], Say], None] | None, shown: Any,
          progress: Callable[[int, int], None] | None) -> None:
    """Do `run.todo` in global batches, data-parallel over `state`'s processes; the main process writes the rows
    (`writer` is None elsewhere) of every process before the first that failed, then the run stops."""
    n_proc = 1 if state is None else state.num_processes
    rank = 0 if state is None else state.process_index
    run.per_process = [0] * n_proc
    done = run.resumed
    for start in range(0, len(run.todo), per * n_proc):
        rows, failure, exc = _attempt(work, run.todo[start + rank * per : start + (rank + 1) * per], rank)
        if n_proc == 1:
            parts = [(rows, failure)]
        else:
            from accelerate.utils import gather_object

            parts = gather_object([(rows, failure)])  # one pair per process, in rank order
        batch: list[Row] = []
        for r, (part, failed) in enumerate(parts):
            if failed is not None:
                break
            run.per_process[r] += len(part)
            batch += part
        stop = _write(writer, batch, check, tell) if writer is not None and batch else None
        if n_proc > 1:
            from accelerate.utils import broadcast_object_list

            told = [stop]
            broadcast_object_list(told)  # a failed write on the main process stops the others too
            stop = told[0]
        if writer is not None and batch and stop is None:
            done += len(batch)
            if shown is not None:
                shown.advance(shown.task_ids[0], len(batch))
            if progress is not None:
                progress(done, run.distinct)
        first = next((failed for _, failed in parts if failed is not None), None)
        if first is None and stop is None:
            continue
        if exc is not None and not isinstance(exc, DiffmemError) and not _is_oom(exc):
            raise exc  # a bug: its own traceback, on its own process
        if writer is None:
            raise SystemExit(QUIET_EXIT)
        if stop is not None:
            raise InputError(stop)
        assert first is not None
        raise _error(first, exc if first.rank == rank else None, len(writer))


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _error(failure: _Failure, own: Exception | None, kept: int) -> Exception:
    """The one-line error the main process raises for the first failed batch (`own`: its exception, if its own)."""
    if failure.output:
        return InputError(f"{failure.message}; the {kept} prompts finished are kept, rerun to resume")
    if isinstance(own, DiffmemError):
        return own
    return InputError(failure.message)


def _write(writer: Any, rows: list[Row], check: Callable[[list[Row], Say], None] | None, tell: Say) -> str | None:
    """Check and append one batch's rows on the main process; returns the one-line error of a failed write."""
    if check is not None:
        check(rows, tell)
    try:
        writer.write_many(rows)
    except InputError as exc:
        return str(exc)
    return None
