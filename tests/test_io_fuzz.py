"""Fuzzing the readers (docs/RELIABILITY.md, "What fuzzing found"): arbitrary bytes as .txt, .jsonl and .csv
prompt files and as result files, arbitrary JSON as model metadata and calibration files. Each either reads or
raises one one-line InputError/ModelLoadError, never another exception. `make test` runs a fixed budget (the
"default" hypothesis profile of tests/conftest.py); `make fuzz` the long one."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from diffmem.errors import DiffmemError, InputError, ModelLoadError
from diffmem.io.files import check_prompt_text, json_problem
from diffmem.io.prompts import read_prompts
from diffmem.io.results import read_results

# Bytes that often break readers, mixed into the random ones.
PIECES = [b"\n", b"\r", b"\r\n", b"\x00", b'"', b",", b"{", b"}", b"[", b"]", b":", b"\xef\xbb\xbf", b"\xff",
          b"\xc3", b"\xe2\x80\x8b", b'\\ud800', b"prompt", b"caption", b"score", b"9" * 40, b"\t", b" "]
noisy_bytes = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=12)), max_size=40).map(b"".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def one_line_or_reads(read: Callable[[], Any], errors: tuple[type[DiffmemError], ...] = (InputError,)) -> None:
    """`read()` returns, or raises one of `errors` with a one-line message."""
    try:
        read()
    except errors as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
@given(data=noisy_bytes)
@example(data=b'{"prompt": "a", "prompt": "b"}\n')
@example(data=b'{"prompt": "\\ud800"}\n')
@example(data=b"prompt,prompt\na,b\n")
@example(data=b"a\rb\r\x00")
@example(data=b"[" * 5000)
def test_prompt_files_read_or_fail_in_one_line(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"p{suffix}"
        path.write_bytes(data)
        one_line_or_reads(lambda: read_prompts(path))


@given(data=noisy_bytes)
@example(data=b'{"prompt": "a", "score": 1' + b"1" * 5000 + b"}\n")
@example(data=b'{"score": 1}\n{"score": 2, "score": 3}\n')
def test_result_files_read_or_fail_in_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jsonl"
        path.write_bytes(data)
        one_line_or_reads(lambda: read_results(path, allow_partial=True))


METADATA = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
            "diffmem.json"]


@pytest.mark.parametrize("name", METADATA)
@given(value=json_values)
@example(value=[])
@example(value={"unet": "UNet2DConditionModel"})
@example(value={"num_train_timesteps": "1000", "prediction_type": 3})
@example(value={"sample_size": [True]})
@example(value={"block_out_channels": []})
def test_model_metadata_reads_or_fails_in_one_line(name: str, value: Any, model_dirs: dict[str, Path]) -> None:
    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.folders import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        folder.mkdir()
        for file in METADATA[:-1]:  # the tiny model's own metadata, then the fuzzed file over one of them
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_bytes((model_dirs["sd1"] / file).read_bytes())
        (folder / name).write_text(json.dumps(value))
        one_line_or_reads(lambda: (resolve_model(folder), ModelDefaults.for_model(folder)), (ModelLoadError,))


@given(data=noisy_bytes)
def test_model_metadata_bytes_read_or_fail_in_one_line(data: bytes) -> None:
    from diffmem.models.folders import read_metadata

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_index.json"
        path.write_bytes(data)
        one_line_or_reads(lambda: read_metadata(path), (ModelLoadError,))


@given(value=json_values)
def test_calibration_files_read_or_fail_in_one_line(value: Any) -> None:
    from diffmem.app.service import _read_calibration

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.json"
        path.write_text(json.dumps(value))
        one_line_or_reads(lambda: _read_calibration(path))


@given(text=st.text(max_size=200))
@example(text="\u200b\u200d\ufeff")
@example(text="\ud800")
def test_the_text_rule_returns_text_none_or_one_line(text: str) -> None:
    try:
        kept = check_prompt_text(text, "p")
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert kept is None or kept == text  # verbatim
    if kept is not None:
        kept.encode("utf-8")  # always writable as UTF-8 (no lone surrogate)


@given(text=st.text(max_size=200))
def test_the_json_rule_never_raises(text: str) -> None:
    value, problem = json_problem(text)
    assert problem is None or "\n" not in problem


@given(st.lists(st.text(max_size=30), max_size=5))
def test_the_library_list_rule_is_the_text_rule_on_each_prompt(prompts: list[str]) -> None:
    """`check_prompts` (Detector.score, explain, training captions) keeps each prompt verbatim exactly when the
    text rule keeps it and it is not blank; anything else is one line naming the prompt's position."""
    from diffmem.io.files import check_prompts

    verdicts = []
    for text in prompts:
        try:
            verdicts.append(check_prompt_text(text))
        except InputError:
            verdicts.append(InputError)
    if all(isinstance(v, str) for v in verdicts):
        assert check_prompts(prompts) == prompts
        return
    with pytest.raises(InputError) as info:
        check_prompts(prompts)
    first = next(i for i, v in enumerate(verdicts) if not isinstance(v, str))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"prompts[{first}]")
