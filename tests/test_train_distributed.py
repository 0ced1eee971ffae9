"""`diffmem train` under `accelerate launch` with two CPU processes: data-parallel, filter decisions gathered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_ranks import weights_hash

TAU = 1.1  # excludes some but not all samples of the tiny sd1 model on the data below


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").is_file(),
                    reason="the accelerate launcher is not installed")
def test_two_processes_train_the_same_weights_and_gather_the_filter(sd1_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a picture number {i} of a red square")
    report = tmp_path / "report"
    report.mkdir()
    common = f"train --model {sd1_dir} --data {data} --batch-size 4 --lr 1e-3 --log-every 1"
    commands = [f"{common} --out {tmp_path / 'run'} --train-steps 4 --filter-threshold {TAU}",
                f"{common} --out {tmp_path / 'none'} --train-steps 2 --filter-threshold 0"]  # every update skipped
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # `--multi_gpu` with ACCELERATE_USE_CPU starts two gloo processes (`--cpu --num_processes 2` starts one).
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "0", str(Path(__file__).parent / "train_ranks.py"),
           str(report), *" + ".join(commands).split()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((report / f"rank{r}_0.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # data-parallel: both processes hold the same weights
    base = weights_hash(UNet2DConditionModel.from_pretrained(sd1_dir / "unet"))
    assert ranks[0]["hash"] != base
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for step, record in enumerate(log):
        local = [ranks[r]["magnitudes"][step] for r in range(2)]
        assert [len(rows) for rows in local] == [2, 2]  # each process measured its half of the batch of 4
        assert record["samples"] == 4
        assert record["excluded_samples"] == sum(d >= TAU for rows in local for d in rows)  # gathered
    assert 0 < sum(r["excluded_samples"] for r in log) < 16

    skipped = [json.loads((report / f"rank{r}_1.json").read_text()) for r in range(2)]
    assert skipped[0]["hash"] == skipped[1]["hash"] == base  # an emptied batch skips its update on all ranks
    log = [json.loads(line) for line in (tmp_path / "none" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [1, 1]
