"""The `diffmem` command line: a thin shell over the library, one module per command group.

`common` holds what every command shares; each group module (`detection`, `explanation`, `serving`, `methods`,
`training`, `generation`, `paper`, `testbed`, `datasets`) imports only `common` and the library, and this module
mounts them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from diffmem.cli import datasets, detection, explanation, generation, methods, paper, serving, testbed, training
from diffmem.cli.common import USAGE_ERROR, ErrorHandlingGroup, debug_wanted, internal_error_line
from diffmem.errors import DiffmemError

app = typer.Typer(
    name="diffmem",
    cls=ErrorHandlingGroup,
    help="Detect training-data memorization in Stable-Diffusion-family text-to-image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _name, _command in (
    ("detect", detection.detect),
    ("evaluate", detection.evaluate),
    ("explain", explanation.explain),
    ("serve", serving.serve),
    ("train", training.train),
    ("generate", generation.generate),
    ("mitigate", generation.mitigate),
    ("fetch-references", paper.fetch_references),
    ("reproduce", paper.reproduce),
    ("compare", paper.compare),
    ("methods", methods.methods),
):
    app.command(_name)(_command)
app.add_typer(testbed.app, name="testbed")
app.add_typer(datasets.app, name="datasets")


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an internal error (a bug) instead of one line; "
                           "DIFFMEM_DEBUG=1 does the same, in every process under `accelerate launch`.")
    ] = False,
) -> None:
    """Options of every command (read back by `ErrorHandlingGroup` through the root context)."""


def main() -> None:
    """The `diffmem` console script: run the app; an error escaping it still ends as one line (exit 2 for a user
    error, 1 for a bug unless --debug or DIFFMEM_DEBUG=1 asks for the traceback)."""
    try:
        app(prog_name="diffmem")
    except DiffmemError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(USAGE_ERROR)
    except Exception as exc:  # outside a command (while parsing): the same contract as ErrorHandlingGroup's
        if debug_wanted():
            raise
        typer.echo(internal_error_line(exc), err=True)
        sys.exit(1)


__all__ = ["app", "main"]
