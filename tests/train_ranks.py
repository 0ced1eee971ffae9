"""Run `diffmem train ARGS...` commands in one process of an `accelerate launch`; write what the test checks.

Usage: `accelerate launch ... tests/train_ranks.py REPORT_DIR train ARGS... [+ train ARGS...]`. For command i
each rank writes REPORT_DIR/rankR_i.json: the world size, a hash of its UNet's weights after training, and the
magnitudes `d` its filter measured on its own rows at each step (to check that logged counts are gathered).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import diffmem.training.finetune as finetune_module
import diffmem.training.loop as train_module
from diffmem.cli import app


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    """Run each command with the filter and `finetune` wrapped to record, then write this rank's reports."""
    report, args = Path(sys.argv[1]), " ".join(sys.argv[2:])
    for i, command in enumerate(args.split(" + ")):
        run(command.split(), report, i)


def run(args: list[str], report: Path, index: int) -> None:
    """Run one `diffmem` command and write this rank's report on it."""
    measured: list[list[float]] = []
    results = []
    magnitudes, finetune = train_module.sample_magnitudes, finetune_module.finetune

    def recording_magnitudes(*a, **k):
        d = magnitudes(*a, **k)
        measured.append(d.tolist())
        return d

    def recording_finetune(*a, **k):
        results.append(finetune(*a, **k))
        return results[-1]

    train_module.sample_magnitudes = recording_magnitudes
    finetune_module.finetune = recording_finetune
    try:
        app(args, standalone_mode=False)
    finally:
        train_module.sample_magnitudes, finetune_module.finetune = magnitudes, finetune
    rank = torch.distributed.get_rank()
    (report / f"rank{rank}_{index}.json").write_text(json.dumps({
        "world": torch.distributed.get_world_size(),
        "hash": weights_hash(results[0].pipe.unet),
        "magnitudes": measured,
    }))


if __name__ == "__main__":
    main()
