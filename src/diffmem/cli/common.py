"""What every `diffmem` command shares: quiet libraries, the one-line error contract, shared options.

User errors (bad files, bad option values, unloadable models, Ctrl-C) end with one `error: ...` line on stderr
and exit code 2, never a traceback. An unexpected exception (a bug) ends with one `error: internal error ...` line
and exit code 1; `diffmem --debug ...` or `DIFFMEM_DEBUG=1` shows its traceback instead. torch and diffusers are
imported inside the commands, so `--help` and argument errors do not wait for them.
"""

from __future__ import annotations

import errno
import os
import sys
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
    from typer.exceptions import TyperException as ClickException
except ImportError:  # older typer: click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # type: ignore[assignment]
from diffmem.errors import DiffmemError, InputError  # noqa: E402

USAGE_ERROR = 2
"""Exit code for every user error (the code typer already uses for usage errors)."""
INTERNAL_ERROR = 1
"""Exit code for an unexpected exception: a bug in diffmem or a library it calls, not the user's input."""
DEBUG_ENV = "DIFFMEM_DEBUG"
"""Set to 1 (like `diffmem --debug`) to see the traceback of an internal error instead of one line."""
_CONTROL_FLOW = (typer.Exit, typer.Abort, ClickException)  # click's own exits and messages: never a bug


def fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(USAGE_ERROR)


def debug_wanted(ctx: Any = None) -> bool:
    """Whether an internal error should show its traceback: `--debug` on the root command (read from `ctx`, or
    from the command line when no context exists yet) or `DIFFMEM_DEBUG` set to 1/true/yes/on."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if ctx is not None:
        return bool(ctx.find_root().params.get("debug"))
    return "--debug" in sys.argv[1:]


def internal_error_line(exc: BaseException) -> str:
    """The one line of an unexpected exception: its type and first line, which process (under `accelerate
    launch` every process prints its own), and how to see the traceback."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    world = os.environ.get("WORLD_SIZE", "1")
    where = f" in process {os.environ.get('RANK', '?')} of {world}" if world.isdigit() and int(world) > 1 else ""
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (f"error: internal error{where}: {' '.join(what.split())} (a bug, not your input: rerun with "
            f"'diffmem --debug ...' or {DEBUG_ENV}=1 to see the traceback, and report it)")


def fail_internal(exc: BaseException) -> NoReturn:
    """Print `internal_error_line(exc)` on stderr and exit with code 1."""
    typer.echo(internal_error_line(exc), err=True)
    raise typer.Exit(INTERNAL_ERROR)


class ErrorHandlingGroup(TyperGroup):
    """Runs every command, sub-app commands included, turning user errors into `fail(...)` (exit 2) and any other
    exception into `fail_internal(...)` (exit 1) unless `--debug` asks for its traceback."""

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
        except _CONTROL_FLOW:
            raise
        except Exception as exc:  # a bug: one line and exit 1, or the traceback with --debug
            if debug_wanted(ctx):
                raise
            fail_internal(exc)


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
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace an output file that holds another kind of file (e.g. a result file "
                 "where prompts go); without it such a file is refused and kept."),
]


def deprecated_option(old: str, new: str) -> Any:
    """A hidden option `old` kept for one release as the deprecated spelling of `new` (read it with `renamed`)."""
    return typer.Option(old, hidden=True, help=f"Deprecated spelling of {new}.")


def renamed(value: Any, old_value: Any, old: str, new: str, default: Any = None) -> Any:
    """The value of option `new` (its default when neither is given), or of its deprecated spelling `old`, which
    prints a one-line warning on stderr; giving both is an error."""
    if old_value is None:
        return default if value is None else value
    if value is not None:
        raise InputError(f"give {new} only ({old} is its deprecated spelling)")
    typer.echo(f"warning: {old} is deprecated and will be removed in the next release; use {new}", err=True)
    return old_value


ItersOpt = Annotated[int | None, typer.Option("--iters", help="embedding, sail: at most this many optimisation "
                                              "steps (10).")]
