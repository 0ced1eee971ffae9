"""Crash-safe, resumable JSON Lines result files for long scans.

A :class:`ResultWriter` appends one JSON object per line and flushes and fsyncs after every write call, so
after ``kill -9`` at any moment the file holds complete rows plus at most one partial last line, which the
next open removes. Resume contract: rows are keyed (by default by their ``"prompt"`` text); reopening the
file loads the keys already written into ``done``, and :meth:`ResultWriter.pending` returns the input items
still to score, in input order, each key once. A caller that scores ``pending(...)`` in order and writes
each row as it is scored ends with exactly the file an uninterrupted run writes: one row per distinct key,
in input order (first occurrence of a duplicated prompt), however often it was interrupted, as long as the
input is unchanged.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Set
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

from diffmem.errors import InputError
from diffmem.io.durable import fsync_dir
from diffmem.io.files import MAX_PROMPT_FILE_BYTES, json_problem, kind_of_node, read_user_bytes

T = TypeVar("T")
BOM = b"\xef\xbb\xbf"
KeyFn = Callable[[dict[str, Any]], Hashable]


def prompt_key(row: Mapping[str, Any]) -> Hashable:
    """The default row key: the prompt text, so a prompt repeated in the input is scored and written once."""
    key = row["prompt"]
    if not isinstance(key, str):  # no scan writes another type: the file is damaged or not a result file
        raise TypeError(f"its prompt is {type(key).__name__}, not text")
    return key


def to_jsonable(obj: Any) -> Any:
    """Convert to plain JSON types: NaN/inf become None (JSON has no NaN), numpy/torch values Python ones."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key: to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_jsonable(obj.tolist())
    return obj


def json_line(row: Mapping[str, Any]) -> str:
    """One row as a single line of strict JSON (no NaN/Infinity; newlines inside strings are escaped)."""
    return json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False)


ParsedRows = tuple[list[tuple[int, dict[str, Any]]], int, Literal["none", "unterminated", "partial"]]


def _parse(data: bytes, path: Path) -> ParsedRows:
    """Parse JSON Lines bytes into (line number, row) pairs, the byte length of the newline-terminated part
    and the state of the text after the last newline: none, a complete row missing its newline, or a partial
    row. A corrupt newline-terminated line raises InputError: it cannot come from an interrupted write."""
    end = data.rfind(b"\n") + 1
    rows = []
    lines = data[:end].split(b"\n")[:-1]
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(BOM)  # the text rule: a leading BOM (an editor's) is dropped
        if raw.strip():
            row = _parse_line(raw)
            if row is None:
                raise InputError(
                    f"{path} line {number} is not a JSON object; the file is damaged: fix or remove that line"
                )
            rows.append((number, row))
    tail = data[end:] if end else data.removeprefix(BOM)
    if not tail.strip():
        return rows, end, "none"
    row = _parse_line(tail)
    if row is None:
        return rows, end, "partial"
    rows.append((len(lines) + 1, row))
    return rows, end, "unterminated"


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on one line (by the JSON rule of `diffmem.io.files`), or None if the line is not one (a
    prefix of a row never parses as one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    row, problem = json_problem(text)
    return row if problem is None and isinstance(row, dict) else None


def read_results(path: str | Path, allow_partial: bool = False) -> list[dict[str, Any]]:
    """All rows of a result file, in file order, including rows whose score is null (for the caller to count).

    A partial last row (a scan killed mid-write) raises InputError unless ``allow_partial`` (then it is left
    out).
    """
    p = Path(path)
    rows, _, tail = _parse(read_user_bytes(p, "result file", MAX_PROMPT_FILE_BYTES), p)
    if tail == "partial" and not allow_partial:
        raise InputError(
            f"{p} ends with an incomplete row left by an interrupted scan; rerun the scan on it to finish it"
        )
    if not rows:
        raise InputError(f"{p} holds no result rows")
    return [row for _, row in rows]


class ResultWriter:
    """Append-only, fsynced JSON Lines writer that resumes an interrupted file (see the module docstring).

    ``key`` maps a row to its identity (default: the prompt text). ``match`` names fields (e.g. model, number
    of seeds, steps) whose values every row already in the file must share, so that a scan is never resumed
    with different settings. The file is locked (POSIX ``flock``) while open: a second writer raises.

        >>> import tempfile
        >>> from diffmem import detect, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> prompts, folder = [splits.planted[0].caption, splits.heldout[0].caption], tempfile.TemporaryDirectory()
        >>> with ResultWriter(f"{folder.name}/scores.jsonl", match={"model": "testbed"}) as writer:
        ...     writer.write_many({**row.to_dict(), "model": "testbed"} for row in detect(pipe, prompts[:1]))
        1
        >>> with ResultWriter(f"{folder.name}/scores.jsonl", match={"model": "testbed"}) as writer:  # a rerun resumes
        ...     len(writer), writer.pending(prompts) == prompts[1:]
        (1, True)
        >>> folder.cleanup()
    """

    def __init__(
        self, path: str | Path, key: KeyFn = prompt_key, match: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self._key = key
        self._done: set[Hashable] = set()
        self.n_existing = 0
        """Rows the file held when it was opened."""
        self.repaired: str | None = None
        """What opening fixed in the file (a partial last row removed, a missing final newline added)."""
        if self.path.is_dir():
            raise InputError(f"{self.path} is a folder; give a file path for the results")
        if os.path.lexists(self.path) and not self.path.is_file():
            raise InputError(f"{self.path} is {kind_of_node(os.stat(self.path).st_mode)}, not a result file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        # Unbuffered: a failed write (disk full) is undone at once, with nothing left in a buffer to retry later.
        self._file: IO[bytes] = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - open for the writer's life
        try:
            _lock(self._file, self.path)
            self._resume(match or {})
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            self._file.close()
            raise

    def _resume(self, match: Mapping[str, Any]) -> None:
        """Load the keys already written, check them against ``match`` and repair an interrupted last line."""
        size = os.fstat(self._file.fileno()).st_size
        if size > MAX_PROMPT_FILE_BYTES:  # the bound of every reader of result files (read_results)
            raise InputError(f"{self.path} is over the {MAX_PROMPT_FILE_BYTES >> 20:,} MB diffmem reads as a result "
                             "file; is it the right file?")
        self._file.seek(0)
        rows, end, tail = _parse(self._file.read(), self.path)
        expected = json.loads(json_line(match))  # compare as the values will read back from the file
        first_line: dict[Hashable, int] = {}
        for number, row in rows:
            try:
                key = self._key(row)
                hash(key)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{self.path} line {number} has no usable key ({exc!r})") from None
            if key in first_line:
                raise InputError(
                    f"{self.path} line {number} repeats the key of line {first_line[key]}; "
                    "the file was not written by one diffmem scan"
                )
            first_line[key] = number
            for name, value in expected.items():
                if row.get(name) != value:
                    raise InputError(
                        f"{self.path} line {number} was written with {name}={row.get(name)!r}, this run uses "
                        f"{name}={value!r}; use another output file or the same settings"
                    )
        if tail == "partial":
            self._file.truncate(end)
            self.repaired = "removed an incomplete last row left by an interrupted run"
        elif tail == "unterminated":
            self._file.write(b"\n")
            self.repaired = "added the missing newline after the last row"
        elif end < self._file.tell():
            self._file.truncate(end)  # only whitespace after the last newline
        self._sync()
        self._done = set(first_line)
        self.n_existing = len(rows)

    @property
    def done(self) -> Set[Hashable]:
        """Keys of the rows in the file (read-only view)."""
        return self._done

    def __contains__(self, key: object) -> bool:
        return key in self._done

    def __len__(self) -> int:
        """Number of rows in the file."""
        return len(self._done)

    def pending(self, items: Iterable[T], key: Callable[[T], Hashable] | None = None) -> list[T]:
        """The items still to score, in input order: those whose key (``key(item)``, default the item itself,
        e.g. a prompt string) is not in the file, each key once (the first occurrence)."""
        out: list[T] = []
        seen = set(self._done)
        for item in items:
            k = item if key is None else key(item)
            if k not in seen:
                seen.add(k)
                out.append(item)
        return out

    def write(self, row: Mapping[str, Any]) -> bool:
        """Append one row and fsync; returns False (writing nothing) when its key is already in the file."""
        return self.write_many([row]) == 1

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append rows with one fsync (for a batch scored together); rows whose key is already in the file,
        or repeated within the batch, are left out. Returns how many rows were written."""
        if self._file.closed:
            raise ValueError(f"ResultWriter for {self.path} is closed")
        keys: set[Hashable] = set()
        lines: list[str] = []
        for row in rows:
            k = self._key(dict(row))
            if k not in self._done and k not in keys:
                keys.add(k)
                lines.append(json_line(row) + "\n")  # encode everything before writing anything
        if lines:
            data = memoryview("".join(lines).encode("utf-8"))
            end = os.fstat(self._file.fileno()).st_size
            try:
                while data:  # a raw write may take only part of the bytes
                    written = self._file.write(data)
                    if not written:
                        raise OSError(errno.ENOSPC, "no byte could be written")
                    data = data[written:]
                self._sync()
            except OSError as exc:  # disk full, file size limit: no partial row stays behind
                os.ftruncate(self._file.fileno(), end)
                raise InputError(f"cannot write to {self.path}: {exc.strerror or exc}; its {len(self._done)} "
                                 "earlier rows are kept, rerun to resume") from None
            self._done.update(keys)
        return len(lines)

    def _sync(self) -> None:
        """Push written bytes to the disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (and release its lock)."""
        self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _lock(file: IO[bytes], path: Path) -> None:
    """Take an exclusive lock so two scans never append to the same file (POSIX only)."""
    if sys.platform == "win32":
        return
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{path} is in use by another scan; wait for it or use another file") from None
