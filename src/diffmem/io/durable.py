"""Files that survive a kill: whole-or-nothing replacement and one writer per output.

`write_atomic` writes beside the target and renames over it, so a reader (or a rerun after `kill -9`) sees the
old file or the new one, never half of one. `exclusive` holds a POSIX `flock` on a lock file holding the owner's
pid: a second process on the same output is refused while the first lives, and the lock goes with the process
(the kernel drops it when the process dies, however it dies), so a stale file never blocks a rerun.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffmem.errors import InputError


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) as a whole: write a temporary file beside it, then rename it over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def check_output_path(path: Path, option: str, image: bool = False) -> None:
    """Fail with one line before any work when `path` cannot be an output: a folder on its way is a file, or
    (`image`) matplotlib cannot write its file type."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a folder")
            break
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path")
    if image:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if path.suffix.lstrip(".").lower() not in kinds:
            raise InputError(f"{option} {path}: cannot write a '{path.suffix or '(no extension)'}' image; use one of "
                             f".{', .'.join(sorted(kinds))}")
