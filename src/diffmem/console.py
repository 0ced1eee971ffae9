"""Terminal output shared by the commands and the long runs they start: one stderr console, plain lines, bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def say(console: Console, message: str) -> None:
    """Print one plain line (no markup, no wrapping) to `console`."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def shorten(text: str, width: int = 60) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis, for messages about a prompt."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr; yields the Progress (its `.console` prints above the bar)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        progress.add_task(description, total=total)
        yield progress
