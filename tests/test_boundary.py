"""The error boundary: a bug ends the CLI with one `error: internal error ...` line and exit 1 (`--debug` or
DIFFMEM_DEBUG=1 for its traceback), user errors with exit 2; `load_pipeline` refuses bad devices and dtypes with
one line, before reading anything, and never changes a dtype silently."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffmem.errors import ModelLoadError
from diffmem.models.loading import load_pipeline, warn_unhonoured_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def buggy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """`diffmem evaluate` arguments whose run hits a bug (an exception no user input explains)."""

    def bug(path: Path) -> None:
        raise ValueError("boom\nsecond line of the message")

    monkeypatch.setattr("diffmem.cli.detection._scores", bug)
    monkeypatch.delenv("DIFFMEM_DEBUG", raising=False)
    for name in ("pos.jsonl", "neg.jsonl"):
        (tmp_path / name).write_text("{}\n")
    return ["evaluate", "--positives", str(tmp_path / "pos.jsonl"), "--negatives", str(tmp_path / "neg.jsonl")]


def test_a_bug_is_one_line_and_exit_1(cli, buggy: list[str]) -> None:
    result = cli(*buggy)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("error: internal error: ValueError: boom (")
    assert "--debug" in lines[-1] and "DIFFMEM_DEBUG=1" in lines[-1] and "second line" not in lines[-1]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_debug_shows_the_traceback(cli, buggy: list[str], how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "environment":
        monkeypatch.setenv("DIFFMEM_DEBUG", "1")
    result = cli(*(["--debug", *buggy] if how == "option" else buggy))
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # raised: Python prints it
    assert "internal error" not in result.output


def test_every_process_under_accelerate_says_which_it_is(cli, buggy: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert "error: internal error in process 1 of 2: ValueError" in cli(*buggy).stderr


def test_the_console_script_keeps_the_contract(buggy: list[str], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`main()` (the `diffmem` script and `python -m diffmem.cli`, as `accelerate launch -m` runs it)."""
    from diffmem.cli import main

    for argv, code in ((buggy, 1), (["evaluate", "--positives"], 2), (["detect", "--device", "meta", "--prompts",
                                                                       buggy[2], "--out", buggy[2] + ".out"], 2)):
        monkeypatch.setattr(sys, "argv", ["diffmem", *argv])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == code, capsys.readouterr()
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    monkeypatch.setattr(sys, "argv", ["diffmem", "--debug", *buggy])
    with pytest.raises(ValueError, match="boom"):
        main()


# ---------------------------------------------------------------------------------------------- load_pipeline

@pytest.mark.parametrize(("kwargs", "words"), [
    ({"device": "meta"}, "meta device holds no weights"),
    ({"device": "cuda:99"}, "cuda:99"),
    ({"device": "nonsense"}, "'nonsense' is not a device name"),
    ({"device": "xla"}, "not available on this machine"),
    ({"dtype": "float8"}, "dtype 'float8' is not one"),
    ({"dtype": torch.float8_e4m3fn}, "dtype float8_e4m3fn is not one"),
    ({"dtype": torch.int8}, "dtype int8 is not one"),
    ({"dtype": 16}, "dtype 16 is not one"),
])
def test_bad_devices_and_dtypes_fail_first_with_one_line(tmp_path: Path, kwargs: dict, words: str) -> None:
    if kwargs.get("device") == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    with pytest.raises(ModelLoadError, match=words) as info:
        load_pipeline(tmp_path / "no-such-model", **kwargs)  # checked before the model is looked for
    assert "\n" not in str(info.value)


def test_dtypes_are_honoured_on_the_cpu(sd1_dir: Path, sd1_pipe) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dtype .* is not honoured")
        for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            pipe = load_pipeline(sd1_dir, device="cpu", dtype=name)
            assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == dtype
    with pytest.warns(UserWarning, match=r"dtype float16 is not honoured for: .*unet \(float32\)"):
        warn_unhonoured_dtype(sd1_pipe, torch.float16)  # what a library keeping weights in float32 would get
