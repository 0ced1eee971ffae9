"""Reading user files by one set of rules: the one reader primitive, the text rule and the JSON rule.

Every reader of a file a user gives (prompt and result files, model metadata, calibration files, manifests,
training captions, resume state) opens it with :func:`open_user_file`: only a regular file is read (a device, a
FIFO or a socket is refused in one line before a byte is read, so `/dev/zero` cannot be read forever), and at
most `max_bytes` of it. Lines come from :func:`iter_lines` (bounded length; `\\n`, `\\r\\n` and a lone `\\r` end
a line; invalid UTF-8 is named by byte, offset and line). JSON text goes through :func:`parse_json` (bounded
nesting, bounded integers, no repeated keys, no lone surrogates), and a prompt's text through
:func:`check_prompt_text`, which the CLI, the library and the HTTP API share (docs/RELIABILITY.md, "Text").
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from diffmem.errors import DiffmemError, InputError

MB = 1 << 20
MAX_PROMPT_FILE_BYTES = 1 << 30
"""Largest prompt or result file read (1 GiB: tens of millions of prompts)."""
MAX_METADATA_BYTES = 16 * MB
"""Largest JSON metadata file read (model configs, diffmem.json, calibration, manifests, resume state)."""
MAX_LINE_BYTES = 64 * MB
"""Longest line read; a longer one is a broken or binary file (a prompt is refused far earlier, by length)."""
MAX_PROMPT_CHARS = 20_000
"""Longest prompt read: far beyond any text encoder's window; a longer "prompt" is a broken or binary file."""
MAX_JSON_DEPTH = 64
"""Deepest JSON nesting read (diffmem's own files nest 4 levels at most)."""
MAX_INT_DIGITS = 64
"""Longest JSON integer read (Python would otherwise fail past 4,300 digits, or spend seconds on fewer)."""
_CONTROL_OK = frozenset("\t\n\r")
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # fillers and the braille blank: no visible mark
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_NEWLINE = re.compile(rb"\r\n|\r|\n")


def kind_of_node(mode: int) -> str:
    """What a non-regular file is, in words (for one-line refusals)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class _Bounded:
    """A binary reader that raises once more than `limit` bytes were read (a file may grow while it is read)."""

    def __init__(self, raw: IO[bytes], path: Path, what: str, limit: int, error: type[DiffmemError]) -> None:
        self.raw, self.path, self.what, self.limit, self.error, self.count = raw, path, what, limit, error, 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit + 1 - self.count if size < 0 else min(size, self.limit + 1 - self.count)
        data = self.raw.read(max(want, 0))
        self.count += len(data)
        if self.count > self.limit:
            raise self.error(_too_large(self.path, self.what, self.limit))
        return data


def _too_large(path: Path, what: str, limit: int) -> str:
    return f"{path} is over the {limit / MB:,.0f} MB diffmem reads as a {what}; is it the right file?"


@contextmanager
def open_user_file(path: str | Path, what: str, max_bytes: int = MAX_METADATA_BYTES,
                   error: type[DiffmemError] = InputError) -> Iterator[_Bounded]:
    """Open a user's file for reading, or raise one line: missing ("WHAT not found: PATH"), a folder, a device, a
    FIFO or a socket (never opened, so never blocked on), over `max_bytes`, or unreadable. The reader it yields
    raises the same error if the file grows past `max_bytes` while it is read."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is {kind_of_node(mode)}, not a {what}")
    try:  # O_NONBLOCK: should the path turn into a FIFO after the check, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as raw:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {kind_of_node(info.st_mode)}, not a {what}")
        if info.st_size > max_bytes:
            raise error(_too_large(path, what, max_bytes))
        try:
            yield _Bounded(raw, path, what, max_bytes, error)
        except OSError as exc:
            raise error(f"cannot read {path}: {exc.strerror or exc}") from None


def read_user_bytes(path: str | Path, what: str, max_bytes: int = MAX_METADATA_BYTES,
                    error: type[DiffmemError] = InputError) -> bytes:
    """The bytes of a user's file, read through :func:`open_user_file`."""
    with open_user_file(path, what, max_bytes, error) as f:
        return f.read()


def decode_utf8(data: bytes, path: Path | str, error: type[DiffmemError] = InputError, base: int = 0,
                line: int = 1) -> str:
    """UTF-8 text of `data` (the bytes at offset `base` of a file, starting on line `line`); invalid bytes raise
    one line naming the byte, its offset and its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base + exc.start
        where = line + len(_NEWLINE.findall(data, 0, exc.start))
        raise error(f"{path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {offset} (line {where}); "
                    "save the file as UTF-8") from None


def iter_lines(f: _Bounded, path: Path | str, error: type[DiffmemError] = InputError,
               max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file, streamed: a line ends at `\\n`, `\\r\\n` or a lone `\\r`;
    a leading BOM is dropped; a line over `max_line` bytes raises. An empty file yields nothing."""
    chunk = f.read(MB)
    offset = 0  # file offset of pending[0]
    if chunk.startswith(codecs.BOM_UTF8):
        chunk, offset = chunk[3:], 3
    pending = b""
    number = 1
    while chunk or pending:
        data, eof = pending + chunk, not chunk
        start = 0
        for match in _NEWLINE.finditer(data):
            if not eof and match.group() == b"\r" and match.end() == len(data):
                break  # a \r at the end of a chunk may be the first half of \r\n
            yield number, decode_utf8(data[start:match.start()], path, error, offset + start, number)
            number += 1
            start = match.end()
        pending, offset = data[start:], offset + start
        if len(pending) > max_line:
            raise error(f"{path} line {number} is over {max_line / MB:,.0f} MB with no line end; is it a text file?")
        if eof:
            if pending:
                yield number, decode_utf8(pending, path, error, offset, number)
            return
        chunk = f.read(MB)


# ------------------------------------------------------------------------------------------------ JSON


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONRuleError(f"repeats the key {key!r}")
        out[key] = value
    return out


class _JSONRuleError(ValueError):
    """A JSON text that parses but breaks diffmem's JSON rule."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _JSONRuleError(f"holds an integer of {digits:,} digits (diffmem reads up to {MAX_INT_DIGITS})")
    return int(text)


def _depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, strings aside."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def json_problem(text: str) -> tuple[Any, str | None]:
    """Parse `text` by diffmem's JSON rule: (value, None), or (None, what is wrong) for invalid JSON, nesting
    deeper than MAX_JSON_DEPTH, an integer over MAX_INT_DIGITS digits, a repeated key or a lone surrogate."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        return None, f"nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        value = json.loads(text, object_pairs_hook=_no_repeats, parse_int=_bounded_int)
    except _JSONRuleError as exc:
        return None, str(exc)
    except json.JSONDecodeError as exc:
        line = f"line {exc.lineno} " if exc.lineno > 1 else ""
        return None, f"invalid JSON at {line}column {exc.colno}: {exc.msg}"
    except (ValueError, RecursionError) as exc:
        return None, f"invalid JSON: {' '.join(str(exc).split())}"
    if _SURROGATE_ESCAPE.search(text.encode("utf-8", "surrogatepass")) and _has_surrogate(value):
        return None, "holds a lone surrogate (a \\ud800-\\udfff escape that is not half of a pair): not Unicode text"
    return value, None


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def read_user_json(path: str | Path, what: str, error: type[DiffmemError] = InputError,
                   max_bytes: int = MAX_METADATA_BYTES, missing: Any = ...) -> Any:
    """A user's JSON file by the reader primitive and the JSON rule; `missing` (when given) is returned for a
    file that does not exist. Every problem is one line naming the file."""
    path = Path(path)
    if missing is not ... and not os.path.lexists(path):
        return missing
    data = read_user_bytes(path, what, max_bytes, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not a readable JSON file: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start}); save it as UTF-8") from None
    value, problem = json_problem(text.removeprefix("\ufeff"))
    if problem is not None:
        if problem.startswith("invalid JSON"):
            raise error(f"{path} is not valid JSON{problem.removeprefix('invalid JSON')}")
        raise error(f"{path} {problem}")
    return value


def read_json_object(path: str | Path, what: str, error: type[DiffmemError] = InputError,
                     max_bytes: int = MAX_METADATA_BYTES, missing: Any = ...) -> dict[str, Any]:
    """:func:`read_user_json` for a file that must hold one JSON object."""
    value = read_user_json(path, what, error, max_bytes, missing)
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ text


def _invisible(ch: str) -> bool:
    return ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp")


def check_prompt_text(text: str, where: str = "", max_chars: int | None = MAX_PROMPT_CHARS) -> str | None:
    """The one text rule for a prompt, in files, the library and the HTTP API: the text verbatim (no Unicode
    normalisation), None when it is blank (only whitespace and invisible characters: zero-width and other format
    characters), or one-line InputError (prefixed "`where`: ") for a lone surrogate, a NUL or another control
    character (tab, CR and LF aside), or more than `max_chars` characters."""
    prefix = f"{where}: " if where else ""
    if max_chars is not None and len(text) > max_chars:
        raise InputError(f"{prefix}a prompt of {len(text):,} characters, over the {max_chars:,} read (a text encoder "
                         "sees only its first few dozen words); is a newline missing?")
    if "\x00" in text:
        raise InputError(f"{prefix}the prompt holds a NUL character; is this a text file?")
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            raise InputError(f"{prefix}the prompt holds a lone surrogate (U+{code:04X}), which is not Unicode text")
        if (code < 0x20 or 0x7F <= code < 0xA0) and ch not in _CONTROL_OK:
            raise InputError(f"{prefix}the prompt holds the control character U+{code:04X}; is this a text file?")
    if all(_invisible(ch) for ch in text):
        return None
    return text


def check_prompt(text: object, where: str = "the prompt", max_chars: int | None = MAX_PROMPT_CHARS) -> str:
    """A prompt given to the library or the API: a string that passes :func:`check_prompt_text` and is not blank,
    else one InputError line naming it (`where`)."""
    if not isinstance(text, str):
        raise InputError(f"{where} must be a string, not {type(text).__name__}")
    if check_prompt_text(text, "" if where == "the prompt" else where, max_chars) is None:
        raise InputError(f"{where} is empty")
    return text


def check_prompts(prompts: object, what: str = "prompts") -> list[str]:
    """A list of prompts given to the library (`Detector.score`, training captions): each by :func:`check_prompt`;
    a bare string (which would be scored character by character) or a non-list is one InputError line."""
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Iterable):
        hint = " (wrap one prompt in a list: [prompt])" if isinstance(prompts, str) else ""
        raise InputError(f"{what} must be a list of strings, not {type(prompts).__name__}{hint}")
    return [check_prompt(text, f"{what}[{i}]") for i, text in enumerate(prompts)]
