"""Check a diffusers folder's weight files before loading them: safetensors only, whole, none missing.

Pickled weights (`.bin`, `.ckpt`, `.pt`, `.pth`, `.pkl`) can run arbitrary code when unpickled, so a folder
whose weights exist only in that form is refused unless the caller says it trusts the folder
(`allow_pickle=True`, `--allow-pickle` on the command line). A safetensors file is checked against its own
header (the byte length its tensors need), so a truncated download or an interrupted copy is named as such
instead of surfacing as a loader error deep inside diffusers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from diffmem.errors import ModelLoadError
from diffmem.io.files import read_json_object

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHTED_PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components that carry weights (tokenizers and schedulers are JSON and text)."""
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt")
"""A tokenizer folder holds at least one of these (its vocabulary); without one, transformers builds a tokenizer
that knows no words and no length."""
ALLOW_HINT = "pass --allow-pickle (allow_pickle=True in load_pipeline) only if you trust"
_MAX_HEADER = 100 * 2**20  # a safetensors header above 100 MB is damage, not a model


def check_weights(source: str | Path, allow_pickle: bool = False) -> None:
    """Fail with one line unless every weighted component the model_index.json of the local folder `source`
    lists has a config and whole safetensors weights (or, with `allow_pickle`, pickled ones). A hub id is left
    to the loader (which is told to fetch safetensors only)."""
    folder = Path(source)
    if not (folder / "model_index.json").is_file():
        return
    from diffmem.models.folders import read_metadata

    spec = read_metadata(folder / "model_index.json")
    for part in (*WEIGHTED_PARTS, *TOKENIZER_PARTS):
        entry = spec.get(part)
        if not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        sub = folder / part
        if not sub.is_dir():
            raise ModelLoadError(f"{folder} is incomplete: model_index.json lists {part} but {sub} is missing "
                                 "(an interrupted download or copy?)")
        if part in TOKENIZER_PARTS:
            if not any((sub / name).is_file() for name in TOKENIZER_FILES):
                raise ModelLoadError(f"{sub} has no vocabulary ({', '.join(TOKENIZER_FILES)}): the folder is "
                                     "incomplete")
            continue
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"{sub} has no config.json: the folder is incomplete")
        _check_part(sub, folder, allow_pickle)


def _check_part(sub: Path, folder: Path, allow_pickle: bool) -> None:
    """One component folder: whole safetensors files, else pickled ones only when allowed, else an error."""
    files = sorted(p for p in sub.iterdir() if p.is_file())
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if safe:
        for path in safe:
            check_safetensors(path)
        for index in sub.glob("*.safetensors.index.json"):
            _check_shards(index)
        return
    if pickled:
        if allow_pickle:
            return
        raise ModelLoadError(
            f"{sub} holds pickled weights ({', '.join(pickled)}), which can run code when loaded; diffmem reads "
            f"safetensors only: convert them (save_pretrained(..., safe_serialization=True)), or {ALLOW_HINT} "
            f"{folder}"
        )
    raise ModelLoadError(f"{sub} has no weights (no .safetensors file): the folder is incomplete")


def check_safetensors(path: Path) -> None:
    """Fail with one line if `path` is not a whole safetensors file: its size must be what its header says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER:
            raise ModelLoadError(f"could not load {path}: damaged, not a safetensors file ({size} bytes)")
        raw = f.read(n)
    if len(raw) < n:
        raise ModelLoadError(f"could not load {path}: truncated, {size} bytes, shorter than its own "
                             "header (an interrupted download or copy?)")
    try:
        header = json.loads(raw)
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelLoadError(f"could not load {path}: damaged, its safetensors header is not readable") from None
    expected = 8 + n + end
    if size < expected:
        raise ModelLoadError(f"could not load {path}: truncated, {size} of its {expected} bytes (an "
                             "interrupted download or copy?)")
    if size > expected:
        raise ModelLoadError(f"could not load {path}: damaged, {size - expected} bytes more than its header describes")


def _check_shards(index: Path) -> None:
    """Every shard a sharded checkpoint's index names must be present (each was checked as a file already)."""
    try:
        names = set(read_json_object(index, "weight index", ModelLoadError)["weight_map"].values())
    except (ModelLoadError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{index} is damaged: not a JSON weight index") from None
    missing = sorted(n for n in names if not (index.parent / n).is_file())
    if missing:
        raise ModelLoadError(f"{index.parent} is incomplete: shard {missing[0]} is missing")
