"""Read prompt files (.txt, .jsonl, .csv, .parquet) into prompts plus their per-row records.

Every problem with a file is an :class:`InputError` whose message names the file and the line or row. Empty
prompts are skipped, but each skip is recorded in :attr:`PromptFile.skipped` so that the caller can report it.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from diffmem.errors import InputError
from diffmem.io.files import (
    MAX_PROMPT_CHARS,
    MAX_PROMPT_FILE_BYTES,
    check_prompt_text,
    iter_lines,
    json_problem,
    open_user_file,
)

DEFAULT_COLUMNS = ("prompt", "caption")
"""Columns tried in order when no column is named."""

_KINDS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_CSV_EXTRA = "\0extra fields"  # DictReader's restkey: marks a row with more fields than the header

Row = tuple[str, dict[str, Any] | None]  # ("line 3", the row's fields, or None for a blank line)


@dataclass(frozen=True)
class PromptFile(Sequence[str]):
    """The prompts of a file, in file order; behaves as a sequence of prompt strings.

    ``records[i]`` holds all fields of the i-th kept row with ``"prompt"`` set to its prompt text (for .txt
    the record is just ``{"prompt": line}``); ``skipped`` has one message per row skipped as empty, e.g.
    "line 4: empty prompt".
    """

    path: Path
    column: str
    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        """The prompt texts, in file order (duplicates kept)."""
        return [r["prompt"] for r in self.records]

    def skipped_summary(self, limit: int = 5) -> str | None:
        """One line reporting the skipped rows (None when nothing was skipped), for the CLI to print."""
        if not self.skipped:
            return None
        shown = "; ".join(self.skipped[:limit])
        more = f"; and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} empty rows in {self.path}: {shown}{more}"

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [r["prompt"] for r in self.records[index]]
        prompt: str = self.records[index]["prompt"]
        return prompt

    def __iter__(self) -> Iterator[str]:
        return (r["prompt"] for r in self.records)


def read_prompts(path: str | Path, column: str | None = None) -> PromptFile:
    r"""Read a prompt file: .txt (one prompt a line), .jsonl, .csv or .parquet (column ``column``, else
    ``prompt``, else ``caption``). Empty prompts are skipped and listed in ``skipped``; all else raises.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "prompts.csv"
        ...     _ = path.write_text("id,caption\n7,a orange ring at the center on a gradient background\n8,\n")
        ...     prompts = read_prompts(path)  # the caption column: there is no prompt column
        >>> list(prompts), prompts.records[0]["id"], prompts.skipped  # doctest: +NORMALIZE_WHITESPACE
        (['a orange ring at the center on a gradient background'], '7', ['line 3: empty prompt'])
    """
    p = Path(path)
    kind = _kind(p)
    if kind == "txt":
        if column not in (None, "prompt"):
            raise InputError(f"{p}: a .txt file holds one prompt a line, no columns; --column does not apply")
        with open_user_file(p, "prompt file", MAX_PROMPT_FILE_BYTES) as f:
            rows: list[Row] = [(f"line {i}", {"prompt": line}) for i, line in iter_lines(f, p)]
        return _collect(p, rows, "prompt")
    if kind == "jsonl":
        rows = _jsonl_rows(p)
        return _collect(p, rows, _pick_column(p, _keys(rows), column))
    if kind == "csv":
        names, rows = _csv_rows(p)
        return _collect(p, rows, _pick_column(p, names, column))
    names, rows = _parquet_rows(p)
    return _collect(p, rows, _pick_column(p, names, column))


def read_records(path: str | Path, column: str | None = None) -> list[dict[str, Any]]:
    """The kept rows of a prompt file as dicts with at least ``"prompt"`` (plus labels, indices, ... the file
    carries). Use :func:`read_prompts` instead when the skipped rows must be reported."""
    return read_prompts(path, column).records


# ------------------------------------------------------------------------------------------------ helpers


def _kind(path: Path) -> str:
    """The file kind from its suffix; also checks that the file exists."""
    try:
        path.stat()
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {path}") from None
    except OSError as exc:  # a symlink loop, a path through a file, no permission
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a prompt file")
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"{path}: unknown prompt file type '{path.suffix or '(no extension)'}'; "
            "use .txt (one prompt a line), .jsonl, .csv or .parquet"
        )
    return kind


def _one_line(message: object) -> str:
    """Collapse a library's possibly multi-line error text to one line."""
    return " ".join(str(message).split())


def _keys(rows: Iterable[Row]) -> list[str]:
    """All field names seen in the rows, in first-seen order."""
    return list(dict.fromkeys(key for _, row in rows for key in row or ()))


def _pick_column(path: Path, available: Sequence[str], column: str | None) -> str:
    """The column to read: the named one, else the first of DEFAULT_COLUMNS present."""
    shown = ", ".join(n if n.isprintable() else repr(n) for n in available) if available else "none"
    if column is not None:
        if column not in available:
            raise InputError(f"{path} has no column '{column}'; available columns: {shown}")
        return column
    for name in DEFAULT_COLUMNS:
        if name in available:
            return name
    raise InputError(
        f"{path} has neither a 'prompt' nor a 'caption' column; available columns: {shown}; "
        "name one with --column"
    )


def _collect(path: Path, rows: Iterable[Row], column: str) -> PromptFile:
    """Build the PromptFile: skip (and record) blank lines and empty prompts, reject non-text prompts."""
    skipped: list[str] = []
    records = []
    for where, row in rows:
        if row is None:
            skipped.append(f"{where}: blank line")
            continue
        if column not in row:
            raise InputError(f"{path} {where}: no '{column}' field")
        value = row[column]
        if value is not None and not isinstance(value, str):
            raise InputError(f"{path} {where}: '{column}' is a {type(value).__name__}, expected text")
        if value is None or check_prompt_text(value, f"{path} {where}", MAX_PROMPT_CHARS) is None:
            skipped.append(f"{where}: empty prompt")
            continue
        records.append({**row, "prompt": value})
    if not records:
        extra = f" ({len(skipped)} empty rows skipped)" if skipped else ""
        raise InputError(f"{path} holds no prompts{extra}")
    return PromptFile(path=path, column=column, records=records, skipped=skipped)


def _jsonl_rows(path: Path) -> list[Row]:
    """Parse JSON Lines: one object a line (a blank line gives a None row, skipped later)."""
    rows: list[Row] = []
    with open_user_file(path, "prompt file", MAX_PROMPT_FILE_BYTES) as f:
        for i, line in iter_lines(f, path):
            if not line.strip():
                rows.append((f"line {i}", None))
                continue
            row, problem = json_problem(line)
            if problem is not None:
                raise InputError(f"{path} line {i}: {problem}")
            if not isinstance(row, dict):
                got = "null" if row is None else type(row).__name__
                raise InputError(f"{path} line {i}: expected a JSON object, got {got}")
            rows.append((f"line {i}", row))
    return rows


def _csv_rows(path: Path) -> tuple[list[str], list[Row]]:
    """Parse CSV with a header row, strictly: a stray quote or more fields than the header raise."""
    rows: list[Row] = []
    with open_user_file(path, "prompt file", MAX_PROMPT_FILE_BYTES) as f:
        reader = csv.DictReader((line + "\n" for _, line in iter_lines(f, path)), restkey=_CSV_EXTRA, strict=True)
        names = _csv_read(path, reader, rows)
    if not names:
        raise InputError(f"{path} is empty: a CSV prompt file needs a header row and one prompt a row")
    return names, rows


def _csv_read(path: Path, reader: csv.DictReader, rows: list[Row]) -> list[str]:
    """Fill `rows` from a CSV reader, strictly; returns the header's names (each once)."""
    try:
        names = list(reader.fieldnames or [])
        repeated = _repeated(names)
        if repeated:
            raise InputError(f"{path} line 1: the header names the column {repeated[0]!r} twice")
        for row in reader:
            if _CSV_EXTRA in row:
                raise InputError(f"{path} line {reader.line_num}: more fields than the header's {len(names)}")
            rows.append((f"line {reader.line_num}", dict(row)))
    except csv.Error as exc:
        line = reader.reader.line_num  # DictReader's own line_num lags behind on errors
        raise InputError(f"{path} line {line}: malformed CSV ({_one_line(exc)})") from None
    return names


def _repeated(names: Sequence[str]) -> list[str]:
    """The column names a header holds more than once, sorted (linear: a header may have 100,000s of names)."""
    return sorted(name for name, n in Counter(names).items() if n > 1)


def _parquet_rows(path: Path) -> tuple[list[str], list[Row]]:
    """Read a Parquet table (needs pyarrow) into rows numbered from 1."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading .parquet files needs pyarrow: pip install 'diffmem[parquet]'") from None
    with open_user_file(path, "prompt file", MAX_PROMPT_FILE_BYTES) as f:
        try:
            table = pq.read_table(f.raw)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path} is not a readable Parquet file: {_one_line(exc)}") from None
    repeated = _repeated(table.column_names)
    if repeated:
        raise InputError(f"{path} names the column {repeated[0]!r} twice")
    return list(table.column_names), [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]
