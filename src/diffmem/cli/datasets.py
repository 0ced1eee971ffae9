"""`diffmem datasets list` and `diffmem datasets fetch`: the field's standard benchmarks, where they are
published, and a resumable, checksum-verified download (diffmem.io.datasets)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from diffmem.console import say, stderr
from diffmem.errors import InputError

app = typer.Typer(no_args_is_help=True,
                  help="Standard memorization benchmarks: list them, fetch them (then `diffmem reproduce --dataset`).")

DEFAULT_DATA = Path("datasets")
_PIN = re.compile(r"^([^=]+)=([0-9a-fA-F]{64})$")


@app.command("list")
def list_datasets() -> None:
    """The known data sets: what each holds, for which models, its licence and its source."""
    from diffmem.io.datasets import DATASETS

    for d in DATASETS.values():
        typer.echo(f"{d.name}: {d.title}")
        typer.echo(f"  holds:   {d.description}")
        typer.echo(f"  models:  {', '.join(d.models)}")
        typer.echo(f"  licence: {d.licence}")
        typer.echo(f"  source:  {d.source}")
        for f in d.files:
            typer.echo(f"  file:    {f.path} <- {f.url}" + (f" (sha256 {f.sha256[:12]}...)" if f.sha256 else
                                                            " (sha256 recorded on first fetch)"))
        if d.notes:
            typer.echo(f"  note:    {d.notes}")


def _pins(values: list[str] | None) -> dict[str, str]:
    pins = {}
    for value in values or []:
        match = _PIN.match(value.strip())
        if match is None:
            raise InputError(f"--sha256 takes PATH=HEX (64 hex digits), not {value!r}")
        pins[match[1]] = match[2].lower()
    return pins


@app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="A data set of `diffmem datasets list`.")],
    out: Annotated[Path, typer.Option("--out", help="Root folder; the data set lands in OUT/NAME/.")] = DEFAULT_DATA,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="A mirror (URL) or local copy (folder) laid out as OUT/NAME/.")
    ] = None,
    sha256: Annotated[
        list[str] | None, typer.Option("--sha256", help="Pin a file's checksum: PATH=HEX (repeatable).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per connect or read.")] = 30.0,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Further attempts after a network error.")] = 3,
) -> None:
    """Download a data set (resuming), verify its checksums and write its prompt files under OUT/NAME/prompts/."""
    from diffmem.io.datasets import PROMPTS, DatasetFetchSettings
    from diffmem.io.datasets import fetch as run

    if not timeout > 0:
        raise InputError(f"--timeout must be a positive number of seconds, not {timeout}")
    summary = run(name, out, base_url, _pins(sha256), DatasetFetchSettings(timeout=timeout, retries=retries),
                  log=lambda m: say(stderr, m))
    typer.echo(f"{name}: fetched {len(summary.fetched)} files, {len(summary.already)} were already there"
               + (f", extracted {len(summary.extracted)}" if summary.extracted else "") + f" -> {summary.root}")
    if summary.recorded:
        typer.echo(f"recorded the sha256 of {len(summary.recorded)} files with no published checksum in "
                   f"{summary.root / 'manifest.json'}; later fetches and mirrors must match it")
    typer.echo(f"prompts: {summary.root / PROMPTS}/; next: `diffmem reproduce --dataset {name} --data {out} ...`")
