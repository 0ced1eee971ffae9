"""Command-line options shared by several `diffmem` commands (declared once, so their help reads the same)."""

from __future__ import annotations

from typing import Annotated

import typer

AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Also load pickled weights (.bin, .ckpt, .pt), which can run code when "
                 "loaded: only for a model folder you trust. By default only safetensors are read."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="DIFFMEM_TOKEN", show_envvar=True,
                 help="Access token every request must present (Authorization: Bearer, or ?token= once in a "
                 "browser); needed to bind any address but loopback. Prefer the environment variable: a command "
                 "line is visible to other users of the machine."),
]
