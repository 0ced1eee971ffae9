"""The `diffmem` command line: a thin shell over the library, one module per command group.

`common` holds what every command shares; each group module (`detection`, `explanation`, `serving`,
`training`, `generation`, `paper`, `testbed`, `datasets`) imports only `common` and the library, and this module
mounts them.
"""

from __future__ import annotations

import sys

import typer

from diffmem.cli import datasets, detection, explanation, generation, paper, serving, testbed, training
from diffmem.cli.common import USAGE_ERROR, ErrorHandlingGroup
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
):
    app.command(_name)(_command)
app.add_typer(testbed.app, name="testbed")
app.add_typer(datasets.app, name="datasets")


def main() -> None:
    """The `diffmem` console script: run the app; a user error escaping it still ends as one line, exit 2."""
    try:
        app(prog_name="diffmem")
    except DiffmemError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(USAGE_ERROR)


__all__ = ["app", "main"]
