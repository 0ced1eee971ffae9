"""What every `diffmem` command shares: quiet libraries, the one-line error contract, shared options.

User errors (bad files, bad option values, unloadable models, Ctrl-C) end with one `error: ...` line on stderr
and exit code 2, never a traceback. torch and diffusers are imported inside the commands, so `--help` and
argument errors do not wait for them.
"""

from __future__ import annotations

import errno
import os
from enum import Enum
from typing import Annotated, Any, NoReturn

# Read by transformers/diffusers/huggingface_hub when first imported: keep their chatter out of CLI output.
for _name, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
):
    os.environ.setdefault(_name, _value)

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

try:  # typer vendors its own click (typer._click): its usage errors are not click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer: click itself
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]
from diffmem.errors import DiffmemError  # noqa: E402

USAGE_ERROR = 2
"""Exit code for every user error (the code typer already uses for usage errors)."""


def fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(USAGE_ERROR)


class ErrorHandlingGroup(TyperGroup):
    """Runs every command, sub-app commands included, turning user errors into `fail(...)`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DiffmemError as exc:
            fail(str(exc))
        except UsageError as exc:  # a bad option or command: one line too, not click's framed box
            if isinstance(exc, NoArgsIsHelpError):
                raise
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            fail(f"{exc.format_message()} (see '{where} --help')")
        except KeyboardInterrupt:
            fail("interrupted (rerun the same command to resume a detect run)")
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}")


class DType(str, Enum):
    """Weight dtypes a model can be loaded in (`diffmem.models.loading.DTYPES`)."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


ModelOpt = Annotated[
    str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed' (the bundled model).")
]
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
