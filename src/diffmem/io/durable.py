"""Files that survive a kill: whole-or-nothing replacement and one writer per output.

`replace_file` is the one writer of every file diffmem writes whole (results rows aside, which `ResultWriter`
appends): it writes a temporary file beside the target, fsyncs it and renames it over, so a reader (or a rerun
after `kill -9`) sees the old file or the new one, never half of one; it never writes over a device, a FIFO or a
socket, and a full disk leaves the old file whole and names the path. `check_output_path` runs before any work:
an output path whose folder is a file, that is a folder, a device or a file of another kind (a result file
is not a prompt file, a PNG is not JSON Lines) is refused unless `force`. `exclusive` holds a POSIX `flock` on
a lock file holding the owner's pid: a second process on the same output is refused while the first lives, and
the lock goes with the process (the kernel drops it when the process dies, however it dies), so a stale file never
blocks a rerun.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffmem.errors import InputError
from diffmem.io.files import kind_of_node

Writer = Callable[[Path], None]
"""Writes a whole file at the path it is given (e.g. `lambda p: fig.savefig(p, format="png")`)."""
KINDS = ("result file", "prompt file", "JSON Lines file", "JSON file", "image", "text file", "binary file")
"""What `file_kind` tells apart, by a small signature: the first row's keys, or the file's magic."""
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"%PDF", b"%!PS", b"II*\x00", b"MM\x00*", b"BM")
_RESULT_KEYS = ("score", "method", "error")  # a detect or generate row holds at least one
FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""The errors of a write that found no room: a full disk, a file-size limit, a quota."""


def replace_file(path: str | Path, data: bytes | str | Writer, done: str | None = None,
                 error: type[InputError] = InputError) -> Path:
    """Replace `path` as a whole with `data` (bytes, UTF-8 text, or a writer called with a temporary path beside
    it): fsynced, then renamed into place (the parent folder is created). A device, FIFO or socket at `path` is
    refused; a write error (disk full, file size limit) removes the temporary file, leaves the old one whole and
    is one `error` line naming `path` (then `done`, e.g. what a run keeps; by default whether the earlier file
    is kept). Returns the path written."""
    path = Path(os.path.realpath(path))  # a symlink's target is replaced, not the link
    _regular_or_absent(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        else:
            _write_bytes(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _regular_or_absent(path)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        if done is None:
            done = "the earlier file is kept" if path.is_file() else "nothing was written"
        raise error(f"cannot write {path}: {exc.strerror or exc}{'; ' + done if done else ''}") from None
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def save_figure(fig: Any, path: str | Path, dpi: int, **kwargs: Any) -> Path:
    """Write a matplotlib figure whole through :func:`replace_file` (format from the suffix, PNG without one)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return replace_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt), **kwargs)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) as a whole (:func:`replace_file`)."""
    replace_file(path, text)


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | Path) -> None:
    """One line unless `path` is a regular file or absent: what a writer that cannot go through
    :func:`replace_file` (an appended, resumable download) checks before opening it."""
    _regular_or_absent(Path(path))


def _regular_or_absent(path: Path, option: str = "") -> None:
    """Raise one line when something other than a regular file is at `path` (a folder, device, FIFO, socket)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"{option + ' ' if option else ''}{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{option + ' ' if option else ''}{path} is a folder; give a file path")
    if not stat.S_ISREG(mode):
        raise InputError(f"{option + ' ' if option else ''}{path} is {kind_of_node(mode)}: diffmem writes only "
                         "regular files")


def file_kind(path: str | Path) -> str | None:
    """What an existing regular file holds, by a small signature (one of KINDS; None when it is missing or empty):
    an image's magic, else the first line of JSON Lines (a row with a score, method or error field is a result
    file, one with a prompt or caption a prompt file), else JSON, text or binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    head = head.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (an editor's) says nothing of the kind
    if not head.strip():
        return None
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or b"<svg" in head[:2048]:
        return "image"
    lines = head.split(b"\n")
    rows = [_json_row(line) for line in (lines[:-1] if len(head) == 1 << 16 else lines) if line.strip()]
    if rows and rows[-1] is None and not head.endswith(b"\n") and len(lines) <= len(rows) + 1:
        if len(rows) == 1 and any(b'"%s": ' % key.encode() in lines[-1] for key in _RESULT_KEYS):
            return "result file"  # one row torn by a kill: its writer cuts it back on resume
        rows = rows[:-1]  # a last row torn by a kill says nothing of the kind
    row = rows[0] if rows else None
    if isinstance(row, dict):
        if not all(isinstance(r, dict) for r in rows):
            return None  # damaged JSON Lines: the command's own reader names the line
        if any(key in row for key in _RESULT_KEYS):
            return "result file"
        if "prompt" in row or "caption" in row:
            return "prompt file"
        return "JSON Lines file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut by the 64 KiB head
            return "binary file"
    return "text file"


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created, holding this pid) while the block runs; raise a
    one-line InputError naming the owner's pid when another process holds it. No-op where flock is missing."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{what} is in use by another diffmem process (pid {owner}, per {lock}); wait for "
                             "it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        os.ftruncate(fd, 0)  # released: no pid left to mislead a reader
    finally:
        os.close(fd)


def _json_row(line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:
        return None


def check_output_path(path: Path, option: str, image: bool = False, kind: str | None = None,
                      force: bool = False, inputs: Mapping[str, str | Path | None] | None = None) -> None:
    """Fail with one line before any work when `path` cannot be an output: a folder on its way is a file, it is a
    folder, a device, a FIFO or a socket, it is the same file as one of the command's `inputs` (option -> path;
    refused even with `force`: the output would destroy what is being read), (`image`) matplotlib cannot write
    its file type, or it holds a file of another kind than `kind` (one of KINDS; an image for `image`) and `force`
    is not set."""
    path = Path(path)
    for name, source in (inputs or {}).items():
        if source is not None and _same_file(path, Path(source)):
            raise InputError(f"{option} {path} is the {name} file the command reads: writing it would destroy "
                             "its input; choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a folder")
            break
    _regular_or_absent(path, option)
    found = file_kind(path)
    wanted = "image" if image else kind
    loose = image and path.suffix.lower() in (".pgf", ".raw", ".rgba")  # formats without a magic of their own
    if found is not None and wanted is not None and found != wanted and not force and not (
            loose and found in ("text file", "binary file")):
        raise InputError(f"{option} {path} holds {_article(found)}, not {_article(wanted)}; pass --force to "
                         "replace it, or choose another path")
    if image:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if path.suffix.lstrip(".").lower() not in kinds:
            raise InputError(f"{option} {path}: cannot write a '{path.suffix or '(no extension)'}' image; use one of "
                             f".{', .'.join(sorted(kinds))}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
