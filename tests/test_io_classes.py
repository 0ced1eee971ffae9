"""Reliability by class (docs/RELIABILITY.md): every reader refuses what is not a regular file, every writer
replaces whole regular files only and keeps the old one on a full disk, one text rule holds in files, the CLI and
the HTTP API, and an output of another kind is kept unless --force."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from diffmem.errors import DiffmemError, InputError, ModelLoadError
from diffmem.explanation.attribution import ExplainConfig
from diffmem.io.durable import check_output_path, file_kind, replace_file
from diffmem.io.files import check_prompt_text, check_prompts, iter_lines, open_user_file, read_json_object
from diffmem.io.prompts import read_prompts
from diffmem.io.results import ResultWriter, read_results
from diffmem.training.finetune import _clean_caption


@pytest.fixture(params=["/dev/null", "/dev/zero", "/dev/full", "fifo", "socket"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A path that is not a regular file, under a name each reader accepts (a link to a device, or the node)."""
    made = tmp_path / "node"
    sock = None
    if request.param == "fifo":
        os.mkfifo(made)
    elif request.param == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(made))
    else:
        os.symlink(request.param, made)
    yield made
    if sock is not None:
        sock.close()


def _named(node: Path, name: str) -> Path:
    """`node` under another name (a link), for readers that go by the suffix."""
    link = node.with_name(name)
    os.symlink(node, link)
    return link


READERS: dict[str, Callable[[Path], Any]] = {
    "prompts .txt": lambda p: read_prompts(_named(p, "p.txt")),
    "prompts .jsonl": lambda p: read_prompts(_named(p, "p.jsonl")),
    "prompts .csv": lambda p: read_prompts(_named(p, "p.csv")),
    "prompts .parquet": lambda p: read_prompts(_named(p, "p.parquet")),
    "results": read_results,
    "JSON": lambda p: read_json_object(p, "calibration file"),
    "model metadata": lambda p: __import__("diffmem.models.folders", fromlist=["x"]).read_metadata(
        _named(p, "model_index.json")),
    "stable range": lambda p: __import__("diffmem.detectors.step_norm", fromlist=["x"]).StableRange.load(p),
    "neuron statistics": lambda p: __import__("diffmem.mitigate.nemo", fromlist=["x"]).NeuronStatistics.load(p),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_what_is_not_a_regular_file(reader: str, node: Path) -> None:
    with pytest.raises((InputError, ModelLoadError)) as info:
        READERS[reader](node)  # a FIFO is never opened: this would block forever otherwise
    assert "\n" not in str(info.value)
    assert any(word in str(info.value) for word in ("a device", "a FIFO", "a socket"))


def test_a_reader_stops_at_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n" * 100)
    with pytest.raises(InputError, match="is over the 0 MB diffmem reads"), \
            open_user_file(path, "prompt file", max_bytes=100) as f:
        f.read()


def test_lines_end_at_lf_crlf_and_lone_cr_and_stream_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa\rb\r\nc\n" + b"x" * (1 << 20) + b"\r\nlast")
    with open_user_file(path, "prompt file") as f:
        lines = list(iter_lines(f, path))
    assert [n for n, _ in lines] == [1, 2, 3, 4, 5]
    assert [t for _, t in lines][:3] == ["a", "b", "c"] and lines[4][1] == "last" and len(lines[3][1]) == 1 << 20
    assert read_prompts(_write(tmp_path / "cr.txt", b"one\rtwo\r")).prompts == ["one", "two"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------- outputs


def test_every_writer_refuses_to_replace_what_is_not_a_regular_file(node: Path) -> None:
    before = os.lstat(node)
    target = Path(os.path.realpath(node))
    kind = stat.S_IFMT(os.stat(target).st_mode)
    for write in (lambda: replace_file(node, "x"), lambda: check_output_path(node, "--out"),
                  lambda: ResultWriter(node)):
        with pytest.raises(InputError, match="diffmem writes only regular files|not a result file"):
            write()
    assert stat.S_IFMT(os.stat(target).st_mode) == kind and os.lstat(node).st_ino == before.st_ino


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_keeps_the_old_file_and_names_the_path(code: int, where: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"old": true}')

    def full(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, where, full)
    with pytest.raises(InputError) as info:
        replace_file(path, '{"new": true}')
    monkeypatch.undo()
    assert str(path) in str(info.value) and "the earlier file is kept" in str(info.value)
    assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_figure_is_written_whole_in_the_format_of_its_suffix(tmp_path: Path) -> None:
    from diffmem.measures.plots import plot_roc

    for name in ("roc.png", "roc.svg", "roc.pdf"):
        out = plot_roc([3.0, 4.0], [1.0, 2.0], tmp_path / name)
        assert file_kind(out) == "image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.pdf", "roc.png", "roc.svg"]


KIND_OF = {
    "scores.jsonl": (b'{"prompt": "a", "score": 1.0, "error": null}\n', "result file"),
    "p.jsonl": (b'{"prompt": "a", "label": 1}\n', "prompt file"),
    "log.jsonl": (b'{"step": 1, "loss": 0.5}\n', "JSON Lines file"),
    "r.json": (b'{\n  "auc": 1\n}\n', "JSON file"),
    "p.txt": (b"a cat\na dog\n", "text file"),
    "i.png": (b"\x89PNG\r\n\x1a\n" + bytes(32), "image"),
    "w.bin": (bytes(range(256)) * 4, "binary file"),
    "empty": (b"", None),
    "bom.jsonl": (b'\xef\xbb\xbf{"prompt": "a", "score": 1.0}\n', "result file"),  # an editor's BOM
    "torn.jsonl": (b'{"prompt": "a", "score": 0.5', "result file"),  # one row cut by a kill
    "torn2.jsonl": (b'{"prompt": "a", "score": 1.0}\n{"prompt": "b", "sc', "result file"),
}


@pytest.mark.parametrize("name", KIND_OF)
def test_file_kinds_by_signature(name: str, tmp_path: Path) -> None:
    data, kind = KIND_OF[name]
    assert file_kind(_write(tmp_path / name, data)) == kind


def test_an_output_of_another_kind_is_kept_unless_forced(tmp_path: Path, cli: Callable) -> None:
    scores = _write(tmp_path / "scores.jsonl", KIND_OF["scores.jsonl"][0])
    refused = cli("testbed", "prompts", "--split", "memorized", "--out", scores)
    assert refused.exit_code == 2 and "holds a result file, not a prompt file" in refused.stderr
    assert scores.read_bytes() == KIND_OF["scores.jsonl"][0]
    again = cli("testbed", "prompts", "--split", "memorized", "--out", tmp_path / "p.jsonl")
    assert again.exit_code == 0 and cli("testbed", "prompts", "--split", "memorized", "--out",
                                        tmp_path / "p.jsonl").exit_code == 0  # the same kind is replaced
    forced = cli("testbed", "prompts", "--split", "memorized", "--out", scores, "--force")
    assert forced.exit_code == 0, forced.output
    assert file_kind(scores) == "prompt file"
    png = _write(tmp_path / "roc.png", b'{"prompt": "a"}\n')
    with pytest.raises(InputError, match="holds a prompt file, not an image; pass --force"):
        check_output_path(png, "--plot", image=True)
    check_output_path(png, "--plot", image=True, force=True)


def test_devices_as_outputs_stay_devices(cli: Callable) -> None:
    for args in (["testbed", "prompts", "--split", "memorized", "--out", "/dev/full"],
                 ["detect", "--prompts", "/dev/null", "--out", "/dev/full"]):
        result = cli(*args)
        assert result.exit_code == 2 and "/dev/full is a device" in result.stderr, result.output
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


# ------------------------------------------------------------------------------------------------ text


TEXT = {  # prompt -> what every surface does with it (None: blank; a str: a fragment of the one error line)
    "a cat": "a cat",
    "\u200b\u200d\u2060\ufeff": None,
    " \t ": None,
    "a\x00cat": "holds a NUL character",
    "a\x1bcat": "the control character U+001B",
    "a\ud800cat": "lone surrogate (U+D800)",
    "e\u0301 \u200fmixed\u200e": "e\u0301 \u200fmixed\u200e",
}


def _service_check(prompt: str) -> str:
    from diffmem.app.service import Service

    fake = SimpleNamespace(limits=SimpleNamespace(max_prompt_chars=300))
    return Service.check_prompt(fake, prompt)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", TEXT)
def test_one_text_rule_in_files_the_library_and_the_api(prompt: str, tmp_path: Path) -> None:
    expected = TEXT[prompt]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt}) + "\n")  # ASCII escapes: a lone surrogate survives
    surfaces: dict[str, Callable[[], Any]] = {
        "file": lambda: read_prompts(path).prompts[0],
        "library": lambda: check_prompt_text(prompt),
        "api": lambda: _service_check(prompt),
        "library list": lambda: check_prompts([prompt])[0],  # Detector.score's rule
        "explain": lambda: ExplainConfig().check_prompt(prompt) and prompt,
        "training caption": lambda: _clean_caption(prompt, "c.txt") or None,
    }
    for surface, call in surfaces.items():
        if isinstance(expected, str) and expected == prompt:
            assert call() == prompt, surface  # kept verbatim
            continue
        if expected is None and surface in ("library", "training caption"):
            assert call() is None  # blank: a file skips the row (a caption its image), the CLI and the API refuse
            continue
        with pytest.raises(DiffmemError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        if expected is None:
            assert "no prompts" in message or "is empty" in message, (surface, message)
        else:
            assert expected in message or (surface == "file" and "lone surrogate" in message), (surface, message)


def test_a_result_file_with_a_bom_reads_and_resumes(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", b'\xef\xbb\xbf{"prompt": "a", "score": 1.0}\n')
    assert read_results(path) == [{"prompt": "a", "score": 1.0}]
    with ResultWriter(path) as writer:
        assert "a" in writer and writer.pending(["a", "b"]) == ["b"]


def test_the_library_scores_only_lists_of_prompts_by_the_text_rule(sd1_pipe: Any) -> None:
    """Detector.score refused nothing: a bare string was scored letter by letter, a NUL or a blank prompt
    scored, a non-string a TypeError from the tokenizer (issue 30, second attempt)."""
    import numpy as np

    from diffmem.detectors.magnitude import MagnitudeDetector

    detector = MagnitudeDetector(sd1_pipe)
    bad = {"a cat": "wrap one prompt in a list", 5: "not int", (1,): "prompts[0] must be a string, not int",
           ("a\x00cat",): "prompts[0]: the prompt holds a NUL", ("\u200b",): "prompts[0] is empty",
           ("a \ud800",): "lone surrogate", ("x" * 20_001,): "over the 20,000 read"}
    for prompts, fragment in bad.items():
        with pytest.raises(InputError, match=re.escape(fragment)):
            detector.score(prompts)  # type: ignore[arg-type]
    with_numpy = MagnitudeDetector(sd1_pipe, generations=np.int64(2), seed=np.int64(3))  # numbers, as Python's
    assert (with_numpy.config.generations, with_numpy.config.seed) == (2, 3)
    assert with_numpy.score(["a cat"])[0].score == MagnitudeDetector(sd1_pipe, generations=2, seed=3).score(
        ["a cat"])[0].score


def test_generated_images_with_nan_are_black_and_say_so() -> None:
    import numpy as np

    from diffmem.runs.generation import NON_FINITE, finite_images

    fine = np.full((1, 2, 2, 3), 0.5)
    assert finite_images(fine) == (fine, None)
    broken = fine.copy()
    broken[0, 0, 0] = [np.nan, np.inf, -np.inf]
    images, error = finite_images(broken)
    assert error == NON_FINITE and np.isfinite(images).all() and images[0, 0, 0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("reader", [lambda p: read_prompts(p), lambda p: read_results(p),
                                    lambda p: read_json_object(p, "calibration file")])
def test_a_path_that_cannot_be_resolved_is_named_as_such(tmp_path: Path, reader: Callable[[Path], Any]) -> None:
    """A symlink loop or a path through a file is one line with the system's reason, not "not found"."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "file").write_text("x\n")
    for path in (tmp_path / "a", tmp_path / "file" / "p.txt"):
        with pytest.raises(InputError) as err:
            reader(path)
        message = str(err.value)
        assert "\n" not in message and "not found" not in message and str(path) in message, message


def test_a_result_row_whose_prompt_is_not_text_is_refused_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "score": 1.0}) + "\n" + json.dumps({"prompt": 5, "score": 2.0})
                    + "\n")
    with pytest.raises(InputError, match=r"line 2 has no usable key .*not text"), ResultWriter(path):
        pass
