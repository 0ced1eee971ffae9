"""The catalogue of bad inputs (docs/RELIABILITY.md): every case ends with one `error:` line, exit code 2, no
traceback, and leaves every earlier result byte for byte as it was. Prompts in any script, emoji included, work.

Each case runs in a workspace that holds the earlier results of every command that writes some (a detect file,
a generate folder, a training run), copied from one set made once per module. Full-disk cases run the command in
a subprocess under a file-size limit (`RLIMIT_FSIZE`), which fails writes exactly as a full disk does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.io.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
MB10 = 10_000_000
_held_sockets: list[socket.socket] = []  # ports a case occupies for the length of the test session


# ----------------------------------------------------------------------------------------------- inputs

Setup = Callable[[Path, Path], None]  # (folder of the case's inputs, the tiny model's folder)


def files(**content: str | bytes) -> Setup:
    """A setup writing these files (name -> text or bytes) into the inputs folder."""

    def make(inputs: Path, model: Path) -> None:
        for name, data in content.items():
            (inputs / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return make


def parquet(name: str, **columns: list) -> Setup:
    """A setup writing a Parquet table."""

    def make(inputs: Path, model: Path) -> None:
        pq.write_table(pa.table(columns), inputs / name)

    return make


def model_copy(edit: Callable[[Path], None]) -> Setup:
    """A setup copying the tiny model to inputs/m and damaging the copy with `edit(folder)`."""

    def make(inputs: Path, model: Path) -> None:
        shutil.copytree(model, inputs / "m")
        edit(inputs / "m")

    return make


def _own_defaults(text: str) -> Setup:
    """A setup copying the tiny model with `text` as its diffmem.json (`diffmem.models.defaults`)."""
    return model_copy(lambda m: (m / "diffmem.json").write_text(text))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_unet(folder: Path) -> None:
    """Replace the UNet's safetensors by the same weights pickled (`torch.save`), as older checkpoints ship."""
    import torch
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()


def _edit_json(path: Path, **values: object) -> None:
    """Set fields of a JSON file (e.g. to values of a wrong type)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _damage(path: Path) -> None:
    """Cut a file in the middle, as a torn copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace_by_link(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


def _other_pipeline(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "AudioLDMPipeline"
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _images(folder: Path, n: int = 4, junk: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if junk:
            (folder / f"i{i}.png").write_bytes(b"not an image at all")
        else:
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text(f"a picture number {i}")


def data_folder(junk: bool = False, metadata: bytes | None = None, empty: bool = False) -> Setup:
    """A setup writing a training folder at inputs/data: captioned images, junk images, or a metadata.jsonl."""

    def make(inputs: Path, model: Path) -> None:
        (inputs / "data").mkdir()
        if empty:
            return
        _images(inputs / "data", junk=junk)
        if metadata is not None:
            for caption in (inputs / "data").glob("*.txt"):
                caption.unlink()
            (inputs / "data" / "metadata.jsonl").write_bytes(metadata)

    return make


def _detect_results_in(folder: Path) -> None:
    """A generate --out folder whose results.jsonl is the earlier detect output (another command's file)."""
    folder.mkdir()
    shutil.copy(folder.parent.parent / "scores.jsonl", folder / "results.jsonl")


def busy_port(inputs: Path, model: Path) -> None:
    """Occupy a 127.0.0.1 port and write its number to inputs/port for the case's --port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _held_sockets.append(sock)
    (inputs / "port").write_text(str(sock.getsockname()[1]))


def _nothing(inputs: Path, model: Path) -> None:
    """No inputs beyond the earlier results."""


def fifo(name: str) -> Setup:
    """A setup making a FIFO (named pipe) at inputs/NAME: a reader that opened it would wait forever."""
    return lambda inputs, model: os.mkfifo(inputs / name)


def link(name: str, target: str) -> Setup:
    """A setup making inputs/NAME a symbolic link to `target` (e.g. a device)."""
    return lambda inputs, model: os.symlink(target, inputs / name)


def earlier_file(edit: Callable[[Path], None]) -> Setup:
    """A setup changing the workspace's earlier results (inputs/..) before the snapshot: the case must keep them."""
    return lambda inputs, model: edit(inputs.parent)


def _png(inputs: Path, model: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(inputs / "roc.png")


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (placeholders {in}, {ws}, {model}, {data}, {port}), a fragment its error
    line must hold, the inputs it needs, and for a full disk the file-size limit the command runs under (a
    negative one: that many bytes more than the earlier detect file holds)."""

    args: str
    expected: str
    setup: Setup = _nothing
    fsize: int | None = None


DETECT = "detect --model {model} --out {ws}/new.jsonl --prompts"
SCAN = "detect --model {model} --out {ws}/scores.jsonl --prompts {ws}/more.txt"  # resumes the earlier scan
MODEL = "detect --prompts {ws}/more.txt --out {ws}/new.jsonl --model"
EVAL = "evaluate --negatives {ws}/scores.jsonl --positives"
GEN = "generate --model {model} --prompts {ws}/more.txt --num-inference-steps 2 --out"
TRAIN = "train --model {model} --train-steps 1 --batch-size 2 --checkpoint-every 1"
SERVE = "serve --model {model} --port {port}"
UNET = "unet/diffusion_pytorch_model.safetensors"

CASES: dict[str, Case] = {
    # -- detect: prompt files
    "detect/empty file": Case(f"{DETECT} {{in}}/p.txt", "holds no prompts", files(**{"p.txt": ""})),
    "detect/binary file": Case(f"{DETECT} {{in}}/p.txt", "is not valid UTF-8",
                               files(**{"p.txt": np.random.default_rng(0).bytes(4096)})),
    "detect/non-UTF-8 text": Case(f"{DETECT} {{in}}/p.txt", "byte 0xe9",
                                  files(**{"p.txt": "a cat\ncaf\xe9 au lait\n".encode("latin-1")})),
    "detect/NUL byte in a line": Case(f"{DETECT} {{in}}/p.txt", "line 2: the prompt holds a NUL",
                                      files(**{"p.txt": "a cat\na d\x00og\n"})),
    "detect/NUL in a JSONL prompt": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: the prompt holds a NUL",
                                         files(**{"p.jsonl": '{"prompt": "a \\u0000 cat"}\n'})),
    "detect/10 MB line (txt)": Case(f"{DETECT} {{in}}/p.txt", "line 2: a prompt of 10,000,000 characters",
                                    files(**{"p.txt": "a cat\n" + "x" * MB10 + "\n"})),
    "detect/10 MB line (jsonl)": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: a prompt of 10,000,000 characters",
                                      files(**{"p.jsonl": json.dumps({"prompt": "y" * MB10}) + "\n"})),
    "detect/10 MB field (csv)": Case(f"{DETECT} {{in}}/p.csv", "line 2: malformed CSV (field larger than",
                                     files(**{"p.csv": "prompt\n" + "z" * MB10 + "\n"})),
    "detect/malformed JSONL": Case(f"{DETECT} {{in}}/p.jsonl", "line 3: invalid JSON",
                                   files(**{"p.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n'})),
    "detect/JSONL line not an object": Case(f"{DETECT} {{in}}/p.jsonl", "line 2: expected a JSON object, got list",
                                            files(**{"p.jsonl": '{"prompt": "a"}\n["b"]\n'})),
    "detect/JSONL prompt not text": Case(f"{DETECT} {{in}}/p.jsonl", "line 2: 'prompt' is a int, expected text",
                                         files(**{"p.jsonl": '{"prompt": "a"}\n{"prompt": 7}\n'})),
    "detect/CSV without the column": Case(f"{DETECT} {{in}}/p.csv", "neither a 'prompt' nor a 'caption' column",
                                          files(**{"p.csv": "id,text\n1,a cat\n"})),
    "detect/CSV without --column": Case(f"{DETECT} {{in}}/p.csv --column text", "has no column 'text'",
                                        files(**{"p.csv": "prompt\na cat\n"})),
    "detect/CSV stray quote": Case(f"{DETECT} {{in}}/p.csv", "line 2: malformed CSV",
                                   files(**{"p.csv": 'prompt\n"a "cat\n'})),
    "detect/Parquet without the column": Case(f"{DETECT} {{in}}/p.parquet", "neither a 'prompt' nor a 'caption'",
                                              parquet("p.parquet", text=["a cat"])),
    "detect/Parquet prompt not text": Case(f"{DETECT} {{in}}/p.parquet", "row 1: 'prompt' is a int",
                                           parquet("p.parquet", prompt=[1, 2])),
    "detect/corrupt Parquet": Case(f"{DETECT} {{in}}/p.parquet", "is not a readable Parquet file",
                                   files(**{"p.parquet": b"PAR1" + bytes(64) + b"PAR1"})),
    "detect/unknown file type": Case(f"{DETECT} {{in}}/p.docx", "unknown prompt file type '.docx'",
                                     files(**{"p.docx": "a cat"})),
    "detect/prompt file is a device": Case(f"{DETECT} {{in}}/p.txt", "is a device, not a prompt file",
                                           link("p.txt", "/dev/zero")),
    "detect/prompt file is a FIFO": Case(f"{DETECT} {{in}}/p.txt", "is a FIFO (named pipe), not a prompt file",
                                         fifo("p.txt")),
    "detect/lone surrogate": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: holds a lone surrogate",
                                  files(**{"p.jsonl": '{"prompt": "a \\ud800 cat"}\n'})),
    "detect/control character": Case(f"{DETECT} {{in}}/p.txt", "line 1: the prompt holds the control character U+001B",
                                     files(**{"p.txt": "a \x1b[31mcat\n"})),
    "detect/JSONL repeated key": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: repeats the key 'prompt'",
                                      files(**{"p.jsonl": '{"prompt": "a", "prompt": "b"}\n'})),
    "detect/JSONL nested too deep": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: nests deeper than 64 levels",
                                         files(**{"p.jsonl": '{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000
                                                  + "}\n"})),
    "detect/JSONL huge integer": Case(f"{DETECT} {{in}}/p.jsonl", "line 1: holds an integer of 100,000 digits",
                                      files(**{"p.jsonl": '{"prompt": "a", "n": ' + "9" * 100_000 + "}\n"})),
    "detect/CSV repeated column": Case(f"{DETECT} {{in}}/p.csv", "names the column 'prompt' twice",
                                       files(**{"p.csv": "prompt,prompt\na,b\n"})),
    "detect/only invisible characters": Case(f"{DETECT} {{in}}/p.txt", "holds no prompts (2 empty rows skipped)",
                                             files(**{"p.txt": "\u200b\u200d\n \u2060\ufeff \n"})),
    "detect/missing prompt file": Case(f"{DETECT} {{in}}/absent.txt", "prompt file not found"),
    "detect/prompt file is a folder": Case(f"{DETECT} {{ws}}/gen", "is a folder, not a prompt file"),
    # -- detect: models
    "detect/missing model folder": Case(f"{MODEL} {{in}}/absent", "model folder not found"),
    "detect/model is a file": Case(f"{MODEL} {{ws}}/more.txt", "is a file, not a diffusers pipeline folder"),
    "detect/wrong kind: a results folder": Case(f"{MODEL} {{ws}}/gen", "no model_index.json"),
    "detect/wrong kind: another pipeline": Case(f"{MODEL} {{in}}/m", "missing unet", model_copy(_other_pipeline)),
    "detect/half-written: no UNet weights": Case(f"{MODEL} {{in}}/m", "unet has no weights",
                                                 model_copy(lambda m: (m / UNET).unlink())),
    "detect/half-written: no text encoder": Case(f"{MODEL} {{in}}/m", "lists text_encoder but",
                                                 model_copy(lambda m: shutil.rmtree(m / "text_encoder"))),
    "detect/truncated safetensors": Case(f"{MODEL} {{in}}/m", "truncated", model_copy(lambda m: _truncate(m / UNET))),
    "detect/damaged model_index.json": Case(f"{MODEL} {{in}}/m", "model_index.json is not valid JSON",
                                            model_copy(lambda m: (m / "model_index.json").write_text("{"))),
    "detect/diffmem.json out of range": Case(f"{MODEL} {{in}}/m", "diffmem.json: guidance_scale must be above 1",
                                             _own_defaults('{"guidance_scale": 1}')),
    "detect/diffmem.json unknown field": Case(f"{MODEL} {{in}}/m", "diffmem.json: unknown field 'target-loss'",
                                              _own_defaults('{"target-loss": 1}')),
    "detect/pickled weights": Case(f"{MODEL} {{in}}/m", "--allow-pickle", model_copy(_pickle_unet)),
    "detect/model_index.json a list": Case(f"{MODEL} {{in}}/m", "model_index.json must hold a JSON object, not a list",
                                           model_copy(lambda m: (m / "model_index.json").write_text("[]"))),
    "detect/model_index.json endless": Case(f"{MODEL} {{in}}/m", "model_index.json is a device",
                                            model_copy(lambda m: _replace_by_link(m / "model_index.json",
                                                                                  "/dev/zero"))),
    "detect/model_index.json wrong type": Case(f"{MODEL} {{in}}/m", "unet must be a [library, class] pair",
                                               model_copy(lambda m: _edit_json(m / "model_index.json",
                                                                               unet="UNet2DConditionModel"))),
    "detect/scheduler config wrong type": Case(f"{MODEL} {{in}}/m", "num_train_timesteps must be a positive whole",
                                               model_copy(lambda m: _edit_json(
                                                   m / "scheduler/scheduler_config.json", num_train_timesteps="1000"))),
    # -- detect: options
    "detect/--generations 0": Case(f"{DETECT} {{ws}}/more.txt --generations 0", "Invalid value for '--generations'"),
    "detect/--steps 0": Case(f"{DETECT} {{ws}}/more.txt --steps 0", "--steps 0 must be between 1 and"),
    "detect/--guidance nan": Case(f"{DETECT} {{ws}}/more.txt --guidance nan", "--guidance must be a finite number"),
    "detect/--cosine-weight nan": Case(f"{DETECT} {{ws}}/more.txt --detector anisotropy --cosine-weight nan",
                                       "--cosine-weight must be a finite number"),
    "detect/--batch-size not a number": Case(f"{DETECT} {{ws}}/more.txt --batch-size x",
                                             "Invalid value for '--batch-size'"),
    "detect/--device unknown": Case(f"{DETECT} {{ws}}/more.txt --device toaster", "--device 'toaster' is not"),
    # -- detect: outputs
    "detect/--out is a folder": Case("detect --model {model} --prompts {ws}/more.txt --out {ws}/gen",
                                     "is a folder"),
    "detect/--out under a file": Case("detect --model {model} --prompts {ws}/more.txt --out {ws}/more.txt/s.jsonl",
                                      "more.txt is a file, not a folder"),
    "detect/--out from another command": Case("detect --model {model} --prompts {ws}/more.txt --out "
                                              "{ws}/gen/results.jsonl", "line 1 was written with detector=None"),
    "detect/--out from other settings": Case(f"{SCAN} --seed 3", "line 1 was written with seed=0"),
    "detect/--out damaged mid-file": Case("detect --model {model} --prompts {ws}/more.txt --out {in}/s.jsonl",
                                          "line 2 is not a JSON object; the file is damaged",
                                          files(**{"s.jsonl": '{"prompt": "a"}\nnot json\n{"prompt": "b"}\n'})),
    "detect/full disk": Case(SCAN, "cannot write to", fsize=-20),  # -20: 20 bytes more than the earlier file
    "detect/--out is a device": Case("detect --model {model} --prompts {ws}/more.txt --out /dev/full",
                                     "--out /dev/full is a device"),
    "detect/--out is a FIFO": Case("detect --model {model} --prompts {ws}/more.txt --out {in}/s.jsonl",
                                   "is a FIFO (named pipe)", fifo("s.jsonl")),
    "detect/--out holds prompts": Case("detect --model {model} --prompts {ws}/more.txt --out {in}/p.jsonl",
                                       "holds a prompt file, not a result file; pass --force",
                                       files(**{"p.jsonl": '{"prompt": "a cat"}\n'})),
    # -- evaluate
    "evaluate/missing file": Case(f"{EVAL} {{in}}/absent.jsonl", "result file not found"),
    "evaluate/empty file": Case(f"{EVAL} {{in}}/e.jsonl", "holds no result rows", files(**{"e.jsonl": ""})),
    "evaluate/binary file": Case(f"{EVAL} {{in}}/b.jsonl", "line 1 is not a JSON object",
                                 files(**{"b.jsonl": bytes(range(256))})),
    "evaluate/another command's file": Case(f"{EVAL} {{ws}}/run/log.jsonl", "row 1 has no 'score' field"),
    "evaluate/--target-fpr 2": Case(f"{EVAL} {{ws}}/scores.jsonl --target-fpr 2", "between 0 and 1"),
    "evaluate/--target-fpr nan": Case(f"{EVAL} {{ws}}/scores.jsonl --target-fpr nan", "between 0 and 1, got nan"),
    "evaluate/--plot unknown type": Case(f"{EVAL} {{ws}}/scores.jsonl --plot {{ws}}/roc.xyz",
                                         "cannot write a '.xyz' image"),
    "evaluate/--plot over a result file": Case(f"{EVAL} {{ws}}/scores.jsonl --plot {{in}}/roc.png",
                                               "holds a result file, not an image; pass --force",
                                               earlier_file(lambda ws: shutil.copy(ws / "scores.jsonl",
                                                                                   ws / "in" / "roc.png"))),
    "evaluate/--plot is a device": Case(f"{EVAL} {{ws}}/scores.jsonl --plot {{in}}/roc.png", "is a device",
                                        link("roc.png", "/dev/full")),
    "evaluate/full disk": Case(f"{EVAL} {{ws}}/scores.jsonl --plot {{in}}/roc.png", "cannot write", _png, fsize=2000),
    "evaluate/--positives is a FIFO": Case(f"{EVAL} {{in}}/s.jsonl", "is a FIFO (named pipe), not a result file",
                                           fifo("s.jsonl")),
    "evaluate/--plot under a file": Case(f"{EVAL} {{ws}}/scores.jsonl --plot {{ws}}/more.txt/roc.png",
                                         "is a file, not a folder"),
    # -- explain
    "explain/empty prompt": Case("explain '  ' --model {model}", "the prompt is empty"),
    "explain/unknown --method": Case("explain 'a cat' --model {model} --method magic", "--method must be one of"),
    "explain/--steps out of range": Case("explain 'a cat' --model {model} --steps 99", "--steps 99 must be between"),
    "explain/--suggest without --threshold": Case("explain 'a cat' --model {model} --suggest", "needs --threshold"),
    "explain/--generations 0": Case("explain 'a cat' --model {model} --generations 0",
                                    "Invalid value for '--generations'"),
    "explain/--plot unknown type": Case("explain 'a cat' --model {model} --plot {ws}/chart.doc",
                                        "cannot write a '.doc' image"),
    "explain/pickled weights": Case("explain 'a cat' --model {in}/m", "--allow-pickle", model_copy(_pickle_unet)),
    # -- generate and mitigate
    "generate/--guard without --threshold": Case(f"{GEN} {{ws}}/gen --guard", "--guard needs --threshold"),
    "generate/--threshold nan": Case(f"{GEN} {{ws}}/gen --threshold nan", "--threshold must be a number, not nan"),
    "generate/--guidance 0.5": Case(f"{GEN} {{ws}}/new --guidance 0.5", "--guidance must be above 1"),
    "generate/--out is a file": Case(f"{GEN} {{ws}}/scores.jsonl", "is a file; give a folder"),
    "generate/--out from another command": Case(f"{GEN} {{in}}/o", "line 1 was written with method=None",
                                                lambda i, m: _detect_results_in(i / "o")),
    "generate/--out from other settings": Case(f"{GEN} {{ws}}/gen --seed 5", "line 1 was written with seed=0"),
    "generate/full disk": Case(f"{GEN} {{ws}}/gen", "cannot write", fsize=100),
    "mitigate/unknown --method": Case("mitigate --method magic --model {model} --prompts {ws}/more.txt --out "
                                      "{ws}/mit", "--method must be one of"),
    "mitigate/--sigma nan": Case("mitigate --method gni --sigma nan --num-inference-steps 2 --model {model} --prompts "
                                 "{ws}/more.txt --out {ws}/mit", "--sigma must be 0 or more, not nan"),
    "mitigate/--lr nan": Case("mitigate --method embedding --lr nan --num-inference-steps 2 --model {model} --prompts "
                              "{ws}/more.txt --out {ws}/mit", "--lr must be a positive number"),
    # -- train
    "train/missing --data": Case(f"{TRAIN} --data {{in}}/absent --out {{ws}}/run2", "no such folder"),
    "train/empty --data": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2", "holds no images",
                               data_folder(empty=True)),
    "train/unreadable images": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2", "could be read",
                                    data_folder(junk=True)),
    "train/malformed metadata.jsonl": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2", "line 2 is not JSON",
                                           data_folder(metadata=b'{"file_name": "i0.png", "text": "a"}\n{oops\n')),
    "train/non-UTF-8 metadata.jsonl": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2",
                                           "metadata.jsonl is not valid UTF-8 (line 1)",
                                           data_folder(metadata='{"file_name": "i0.png", "text": "caf\xe9"}\n'
                                                       .encode("latin-1"))),
    "train/--lr nan": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run2 --lr nan", "--lr must be a positive number"),
    "train/--filter-threshold nan": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run2 --filter-threshold nan",
                                         "--filter-threshold must be a number >= 0"),
    "train/--out inside --data": Case(f"{TRAIN} --data {{data}} --out {{data}}/run", "is inside --data"),
    "train/--out is a file": Case(f"{TRAIN} --data {{data}} --out {{ws}}/scores.jsonl", "is a file; give a folder"),
    "train/existing run without --resume": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run",
                                                "already holds a training checkpoint"),
    "train/--resume with other settings": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run --resume --lr 0.5",
                                               "--resume continues the run"),
    "train/pickled weights": Case("train --model {in}/m --data {data} --out {ws}/run2 --train-steps 1",
                                  "--allow-pickle", model_copy(_pickle_unet)),
    "train/--resume with a damaged state.json": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run --resume",
                                                     "state.json is not valid JSON",
                                                     earlier_file(lambda ws: _damage(ws / "run" / "checkpoint"
                                                                                     / "state.json"))),
    "train/--resume with a damaged dataset.json": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run --resume",
                                                       "dataset.json is damaged",
                                                       earlier_file(lambda ws: _edit_json(ws / "run/dataset.json",
                                                                                          key=[]))),
    "train/full disk": Case(f"{TRAIN} --data {{data}} --out {{ws}}/run2", "cannot write a checkpoint",
                            fsize=100_000),
    # -- serve (all refused before the model loads, or as it loads)
    "serve/other host without a token": Case(f"{SERVE} --threshold 1 --host 0.0.0.0", "needs an access token"),
    "serve/token too short": Case(f"{SERVE} --threshold 1 --token abc", "at least 16 characters"),
    "serve/port in use": Case(f"{SERVE} --threshold 1", "cannot listen on 127.0.0.1", busy_port),
    "serve/--threshold nan": Case(f"{SERVE} --threshold nan", "--threshold must be a finite number"),
    "serve/no threshold for a model": Case(SERVE, "needs a detection threshold"),
    "serve/--calibration missing": Case(f"{SERVE} --calibration {{in}}/c.json", "calibration file not found"),
    "serve/--calibration binary": Case(f"{SERVE} --calibration {{in}}/c.json", "not a readable JSON file",
                                       files(**{"c.json": bytes(range(256))})),
    "serve/--calibration from another command": Case(f"{SERVE} --calibration {{ws}}/run/finetune.json",
                                                     "has no numeric 'threshold'"),
    "serve/pickled weights": Case("serve --model {in}/m --threshold 1 --port {port}", "--allow-pickle",
                                  model_copy(_pickle_unet)),
    # -- testbed
    "testbed/unknown --split": Case("testbed prompts --split all --out {ws}/t.jsonl", "Invalid value for '--split'"),
    "testbed/--out under a file": Case("testbed prompts --split memorized --out {ws}/more.txt/t.jsonl", "more.txt"),
    "testbed/--out is a device": Case("testbed prompts --split memorized --out /dev/full",
                                      "--out /dev/full is a device"),
    "testbed/--out holds a result file": Case("testbed prompts --split memorized --out {ws}/scores.jsonl",
                                              "holds a result file, not a prompt file; pass --force"),
    "testbed/quality on a missing model": Case("testbed quality --model {in}/absent --out {ws}/q",
                                               "model folder not found"),
    "testbed/--device unknown": Case("testbed quality --device toaster --out {ws}/q", "--device 'toaster' is not"),
    "testbed/demo --generations 0": Case("testbed demo --generations 0 --out {ws}/demo",
                                         "--generations must be at least 1"),
}

# The second adversarial attempt (issue 30): one case per class it found open, each closed where its class is checked.
WIDE = ",".join(f"c{i}" for i in range(200_000))
CASES.update({
    "detect/--out is the prompt file (--force)": Case(f"{DETECT.replace('{ws}/new.jsonl', '{ws}/more.txt')} "
                                                      "{ws}/more.txt --force",
                                                      "is the --prompts file the command reads"),
    "detect/CSV header of 200,000 columns": Case(f"{DETECT} {{in}}/p.csv", "names the column 'c0' twice",
                                                 files(**{"p.csv": f"{WIDE},c0\n" + "x," * 200_000 + "a cat\n"})),
    "detect/unet config sample_size huge": Case(f"{MODEL} {{in}}/m", "sample_size must be a whole number from 1 to",
                                                model_copy(lambda m: _edit_json(m / "unet/config.json",
                                                                                sample_size=10**9))),
    "detect/unet config in_channels text": Case(f"{MODEL} {{in}}/m", "in_channels must be a whole number",
                                                model_copy(lambda m: _edit_json(m / "unet/config.json",
                                                                                in_channels="4"))),
    "detect/fewer train timesteps than steps": Case(f"{MODEL} {{in}}/m", "num_train_timesteps must be a positive "
                                                    "whole number from 1000",
                                                    model_copy(lambda m: _edit_json(
                                                        m / "scheduler/scheduler_config.json",
                                                        num_train_timesteps=3))),
    "detect/empty tokenizer folder": Case(f"{MODEL} {{in}}/m", "tokenizer has no vocabulary",
                                          model_copy(lambda m: [f.unlink() for f in (m / "tokenizer").iterdir()])),
    "evaluate/score true": Case(f"{EVAL} {{in}}/s.jsonl", "scores must be numbers, not bool",
                                files(**{"s.jsonl": '{"prompt": "a", "score": true}\n'})),
    "evaluate/--plot is the --positives file": Case(f"{EVAL} {{in}}/s.png --plot {{in}}/s.png --force",
                                                    "is the --positives file the command reads",
                                                    files(**{"s.png": '{"prompt": "a", "score": 1.0}\n'})),
    "train/caption with a control character": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2",
                                                   "the prompt holds the control character U+001B",
                                                   data_folder(metadata=b'{"file_name": "i0.png", "text": '
                                                               b'"a \\u001b[31m cat"}\n')),
    "train/metadata.jsonl names files outside": Case(f"{TRAIN} --data {{in}}/data --out {{ws}}/run2",
                                                     "outside --data",
                                                     data_folder(metadata=b'{"file_name": "../i0.png", "text": "a"}'
                                                                 b'\n{"file_name": "/etc/hostname", "text": "b"}\n')),
})


# ----------------------------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory, sd1_dir: Path) -> Path:
    """Earlier results of detect, generate and train (and their inputs), made once: every case runs on a copy
    and must leave each of these files as it was."""
    import torch
    from typer.testing import CliRunner

    from diffmem.cli import app

    root = tmp_path_factory.mktemp("earlier")
    (root / "earlier.txt").write_text("a cat\na dog\n")
    (root / "more.txt").write_text("a cat\na dog\na bird\n")
    _images(root / "data")
    runs = [
        ("detect", "--model", sd1_dir, "--prompts", root / "earlier.txt", "--out", root / "scores.jsonl"),
        ("generate", "--model", sd1_dir, "--prompts", root / "earlier.txt", "--num-inference-steps", 2, "--out",
         root / "gen"),
        ("train", "--model", sd1_dir, "--data", root / "data", "--out", root / "run", "--train-steps", 1,
         "--batch-size", 2, "--checkpoint-every", 1),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in runs:
            result = CliRunner().invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock files, which only hold the pid of their last owner, aside) and the
    hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train.lock"}


def expand(template: str, ws: Path, model: Path, data: Path) -> list[str]:
    """The case's command line with its placeholders filled in, split as a shell would ({port}: the one a
    setup occupied, else a free one)."""
    port = (ws / "in" / "port").read_text() if (ws / "in" / "port").is_file() else str(_free_port())
    text = template.format(**{"in": ws / "in", "ws": ws, "model": model, "data": data, "port": port})
    return shlex.split(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_limited(args: list[str], limit: int) -> tuple[int, str]:
    """`diffmem ARGS` in a subprocess whose files may not grow past `limit` bytes (a full disk, for writes)."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from diffmem.cli import main; sys.argv = ['diffmem', *sys.argv[1:]]; main()")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_loses_nothing(name: str, earlier: Path, sd1_dir: Path, tmp_path: Path,
                                                 cli: Callable) -> None:
    case = CASES[name]
    ws = tmp_path / "ws"
    shutil.copytree(earlier, ws)  # copy2: the training data keep their mtimes, so the run still matches them
    (ws / "in").mkdir()
    case.setup(ws / "in", sd1_dir)
    args = expand(case.args, ws, sd1_dir, earlier / "data")
    before = snapshot(ws)
    if case.fsize is None:
        result = cli(*args)
        code, output, stderr = result.exit_code, result.output, result.stderr
    else:
        limit = case.fsize if case.fsize > 0 else (ws / "scores.jsonl").stat().st_size - case.fsize
        code, output = run_limited(args, limit)
        stderr = output
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert errors[0] == stderr.strip().splitlines()[-1]  # the last thing said
    assert case.expected in errors[0], errors[0]
    after = snapshot(ws)
    assert {k: after.get(k) for k in before} == before, "an earlier file changed or went missing"
    _record(name, errors[0], ws, sd1_dir, earlier / "data")
    while _held_sockets:
        _held_sockets.pop().close()


def _record(name: str, line: str, ws: Path, model: Path, data: Path) -> None:
    """With DIFFMEM_RECORD_ERRORS=FILE, append the case's error line (paths shortened) for docs/RELIABILITY.md."""
    target = os.environ.get("DIFFMEM_RECORD_ERRORS")
    if target:
        shown = line.replace(str(ws / "in"), "IN").replace(str(ws), "WS").replace(str(model), "MODEL")
        shown = shown.replace(str(data), "DATA")
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": name, "line": shown}) + "\n")


def test_the_catalogue_documents_every_case() -> None:
    """docs/RELIABILITY.md lists every case of this file (and no other) with the fragment its test checks."""
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| .*? \| `([^`]*)` \|$", text, flags=re.M)
    assert len(CASES) >= 40
    assert dict(rows) == {name: case.expected.replace("|", "\\|") for name, case in CASES.items()}


# ------------------------------------------------------------------------------------ many scripts work

SCRIPTS = [
    "a cat on a mat",                                   # Latin
    "une crème brûlée à la française, déjà vu",        # Latin with accents
    "кошка сидит на ковре",                             # Cyrillic
    "γάτα στο χαλί",                                    # Greek
    "قطة على السجادة",                                  # Arabic (right to left)
    "חתול על השטיח",                                    # Hebrew (right to left)
    "कालीन पर बिल्ली",                                    # Devanagari (combining marks)
    "แมวบนพรม",                                         # Thai (no spaces)
    "地毯上的猫",                                        # Chinese
    "カーペットの上の猫",                                # Japanese
    "카펫 위의 고양이",                                   # Korean
    "🐱 on a 🧶 👩🏽‍🚀 🏳️‍🌈",                               # emoji, skin tone, ZWJ sequences
    "e\u0301 cafe\u0301 \u200fmixed\u200e marks",       # combining accent, direction marks
]


def test_prompts_in_every_script_are_scored_verbatim(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli) -> None:
    from diffmem.detectors.magnitude import MagnitudeDetector

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in SCRIPTS),
                       encoding="utf-8")
    out = tmp_path / "s.jsonl"
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert [r["prompt"] for r in rows] == SCRIPTS
    expected = MagnitudeDetector(sd1_pipe).score(SCRIPTS)
    assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], rel=1e-5)
    assert all(r["error"] is None for r in rows)


def test_emoji_prompts_explain_and_generate(tmp_path: Path, sd1_dir: Path, cli) -> None:
    explained = cli("explain", SCRIPTS[11], "--model", sd1_dir, "--json")
    assert explained.exit_code == 0, explained.output
    body = json.loads(explained.stdout)
    assert body["prompt"] == SCRIPTS[11] and len(body["words"]) == len(SCRIPTS[11].split())
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(SCRIPTS[8:12]) + "\n", encoding="utf-8")
    generated = cli("generate", "--model", sd1_dir, "--prompts", prompts, "--num-inference-steps", 2, "--out",
                    tmp_path / "g")
    assert generated.exit_code == 0, generated.output
    rows = read_results(tmp_path / "g" / "results.jsonl")
    assert [r["prompt"] for r in rows] == SCRIPTS[8:12]
    names = sorted(p.name for p in (tmp_path / "g" / "images").iterdir())
    assert names == ["0_0.png", "1_0.png", "2_0.png", "3_0.png"]  # named by position, never by prompt text
