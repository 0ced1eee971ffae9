"""`diffmem train`: image-caption folders, bad input, the magnitude filter, resume, Ctrl-C, calibration."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.errors import InputError
from diffmem.training.finetune import (
    FinetuneSettings,
    LatentData,
    epoch_batches,
    finetune,
    interrupted_message,
    scan_folder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _pairs(folder: Path, n: int = 8) -> Path:
    """`n` random 32x32 PNGs with NAME.txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _image(folder / f"img{i}.png", seed=i)
        (folder / f"img{i}.txt").write_text(f"a picture number {i} of a red square\n")
    return folder


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def _unet_weights(unet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unet.parameters()]


def test_caption_files_train_and_list_what_was_skipped(cli, sd1_dir, tmp_path):
    data = _pairs(tmp_path / "data", 6)
    _image(data / "no_caption.png")
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a broken image")
    _image(data / "wide.jpg", size=(48, 40))
    (data / "wide.txt").write_text("a wide picture")
    (data / "orphan.txt").write_text("a caption without its image")
    out = tmp_path / "run"
    result = cli("train", "--model", sd1_dir, "--data", data, "--out", out, "--train-steps", 2, "--batch-size", 4,
                 "--lr", "1e-3", "--log-every", 1)
    assert result.exit_code == 0, result.output
    assert "skipped 3 files" in result.stderr
    for name in ("no_caption.png", "broken.png", "orphan.txt"):
        assert name in result.stderr
    assert "1 images were not at the model's resolution" in result.stderr
    assert "trained steps 0..2" in result.stdout
    index = json.loads((out / "dataset.json").read_text())
    assert len(index["files"]) == 7 and index["resized"] == 1
    from diffmem.models.loading import load_pipeline

    pipe = load_pipeline(out / "pipeline", device="cpu")
    assert pipe.unet.config.sample_size == 8
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_metadata_jsonl_layout(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        _image(data / "images" / f"{i}.png", seed=i)
        rows.append({"file_name": f"images/{i}.png", "text": f"caption {i}"})
    _image(data / "images" / "unlisted.png")
    rows.append({"file_name": "images/missing.png", "text": "gone"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = scan_folder(data)
    assert found.layout == "metadata.jsonl"
    assert [(p.name, c) for p, c in found.items] == [("0.png", "caption 0"), ("1.png", "caption 1"),
                                                     ("2.png", "caption 2")]
    skipped = dict(found.skipped)
    assert "missing" in skipped["images/missing.png"]
    assert "not in metadata.jsonl" in skipped["images/unlisted.png"]


def test_bad_data_and_model_folders_fail_in_one_line(cli, sd1_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    args = ("--train-steps", 2, "--out", tmp_path / "run")
    assert "holds no images" in _error(cli("train", "--model", sd1_dir, "--data", tmp_path / "empty", *args))
    nothing = tmp_path / "uncaptioned"
    nothing.mkdir()
    _image(nothing / "a.png")
    last = _error(cli("train", "--model", sd1_dir, "--data", nothing, *args))
    assert "no usable image and caption pairs" in last and "a.png" in last
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"\x89PNG broken")
    (unreadable / "a.txt").write_text("a caption")
    assert "could be read" in _error(cli("train", "--model", sd1_dir, "--data", unreadable, *args))
    partial = tmp_path / "model"
    for part in ("vae", "text_encoder"):
        (partial / part).mkdir(parents=True)
    data = _pairs(tmp_path / "data", 2)
    assert "has no unet/" in _error(cli("train", "--model", partial, "--data", data, *args))
    assert "inside --data" in _error(cli("train", "--model", sd1_dir, "--data", data, "--out", data / "run"))
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_existing_run_needs_resume_and_same_options(cli, sd1_dir, tmp_path):
    data, out = _pairs(tmp_path / "data", 4), tmp_path / "run"
    first = cli("train", "--model", sd1_dir, "--data", data, "--out", out, "--train-steps", 1, "--batch-size", 2)
    assert first.exit_code == 0, first.output
    assert "--resume" in _error(cli("train", "--model", sd1_dir, "--data", data, "--out", out, "--train-steps", 2))
    last = _error(cli("train", "--model", sd1_dir, "--data", data, "--out", out, "--train-steps", 2, "--resume"))
    assert "--batch-size 2 (now 8)" in last


class Crash(Exception):
    pass


def _settings(sd1_dir: Path, data: Path, **kw) -> FinetuneSettings:
    base = dict(model=str(sd1_dir), data=str(data), steps=4, batch_size=4, lr=1e-3, seed=1)
    return FinetuneSettings(**{**base, **kw})


def test_resume_after_a_crash_equals_an_uninterrupted_run(sd1_dir, tmp_path):
    data = _pairs(tmp_path / "data", 6)
    settings = _settings(sd1_dir, data, filter_threshold=1.1, caption_aug="rta")
    straight = finetune(settings, tmp_path / "a", checkpoint_every=2, log_every=1)

    def crash(step: int, record: dict) -> None:
        if step == 3:  # after step 3 ran, before any checkpoint of it: like a kill
            raise Crash

    with pytest.raises(Crash):
        finetune(settings, tmp_path / "b", checkpoint_every=2, log_every=1, progress=crash)
    resumed = finetune(settings, tmp_path / "b", resume=True, checkpoint_every=2, log_every=1)
    assert resumed.stats["resumed_from"] == 2
    for a, b in zip(straight.pipe.unet.parameters(), resumed.pipe.unet.parameters(), strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(r["samples"] == 4 for r in logs)
    assert 0 < sum(r["excluded_samples"] for r in logs) < 16  # the threshold filters some samples, not all


def test_filter_threshold_zero_skips_every_update_and_infinity_none(sd1_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    data = _pairs(tmp_path / "data", 4)
    base = _unet_weights(UNet2DConditionModel.from_pretrained(sd1_dir / "unet"))
    none_kept = finetune(_settings(sd1_dir, data, steps=2, filter_threshold=0.0), tmp_path / "zero", log_every=1)
    assert none_kept.stats["skipped_steps"] == 2 and none_kept.stats["excluded_share"] == 1.0
    for a, b in zip(base, none_kept.pipe.unet.parameters(), strict=True):
        assert torch.equal(a, b)  # no weight decay, no momentum: the weights did not move
    logs = [json.loads(line) for line in (tmp_path / "zero" / "log.jsonl").read_text().splitlines()]
    assert [(r["excluded"], r["skipped_steps"]) for r in logs] == [(1.0, 1), (1.0, 1)]
    all_kept = finetune(_settings(sd1_dir, data, steps=2, filter_threshold=math.inf), tmp_path / "inf")
    assert all_kept.stats["skipped_steps"] == 0 and all_kept.stats["excluded_share"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(base, all_kept.pipe.unet.parameters(), strict=True))


def test_ctrl_c_writes_a_checkpoint_then_stops(sd1_dir, tmp_path):
    data, out = _pairs(tmp_path / "data", 4), tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)

    def interrupt(step: int, record: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the end of step 2

    with pytest.raises(KeyboardInterrupt):
        finetune(_settings(sd1_dir, data), out, checkpoint_every=100, progress=interrupt)
    assert "checkpoint at step 2" in interrupted_message(out) and "--resume" in interrupted_message(out)
    assert signal.getsignal(signal.SIGINT) is before
    assert finetune(_settings(sd1_dir, data), out, resume=True).stats["resumed_from"] == 2


def test_filter_persist_through_the_cli_logs_dropped_captions(cli, sd1_dir, tmp_path):
    data = _pairs(tmp_path / "data", 4)
    result = cli("train", "--model", sd1_dir, "--data", data, "--out", tmp_path / "run", "--train-steps", 2,
                 "--batch-size", 4, "--log-every", 1, "--filter-threshold", 0, "--filter-persist")
    assert result.exit_code == 0, result.output
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["dropped_captions"] for r in logs] == [4, 4]  # TAU 0 flags every captioned sample at once
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["filter_persist"] is True
    both = cli("train", "--model", sd1_dir, "--data", data, "--out", tmp_path / "o", "--filter-threshold", 1,
               "--filter-persist", "--caption-aug", "rta")
    assert both.exit_code == 2 and "use one of them" in both.stderr.strip().splitlines()[-1]


def test_calibrate_writes_percentiles_and_a_suggested_threshold(cli, sd1_dir, tmp_path):
    data, out = _pairs(tmp_path / "data", 4), tmp_path / "run"
    result = cli("train", "--model", sd1_dir, "--data", data, "--out", out, "--calibrate", "--measurements", 24)
    assert result.exit_code == 0, result.output
    cal = json.loads((out / "calibration.json").read_text())
    values = list(cal["percentiles"].values())
    assert list(cal["percentiles"]) == ["50", "90", "95", "99", "99.9"] and values == sorted(values)
    assert cal["suggested_tau"] == cal["percentiles"]["99"] and cal["measurements"] == 24
    assert cal["samples"] == 4 and len(cal["highest_files"]) == 4
    assert cal["filter_at"] == "first-step" and "measurements at the first sampling step" in result.stdout
    paper = cli("train", "--model", sd1_dir, "--data", data, "--out", tmp_path / "paper", "--calibrate",
                "--measurements", 24, "--filter-at", "train")
    assert paper.exit_code == 0, paper.output
    assert "measurements at uniform over the training timesteps" not in paper.stdout
    assert "measurements at random training timesteps" in paper.stdout
    assert json.loads((tmp_path / "paper" / "calibration.json").read_text())["percentiles"] != cal["percentiles"]
    assert f"suggested --filter-threshold {cal['suggested_tau']:.4g}" in result.stdout
    assert not (out / "checkpoint").exists()


def test_batches_walk_through_seeded_epochs_and_rta_is_seeded(sd1_pipe):
    from diffmem.training.finetune import _rta_augment

    data = LatentData(torch.arange(10.0).reshape(10, 1, 1, 1), [f"a red circle number {i}" for i in range(10)],
                      [f"{i}.png" for i in range(10)], [], 0, "caption files")
    batch = epoch_batches(data, 4, seed=3)
    first_epoch = [int(v) for s in range(2) for v in batch(s)[0].flatten()] + [int(v) for v in batch(2)[0][:2]]
    assert sorted(first_epoch) == list(range(10))
    assert torch.equal(batch(5)[0], epoch_batches(data, 4, seed=3)(5)[0])
    augment = _rta_augment(sd1_pipe.tokenizer, FinetuneSettings(model="m", data="d", rta_tokens=3, seed=1))
    captions = epoch_batches(data, 4, seed=3, augment=augment)(1)[1]
    assert captions == epoch_batches(data, 4, seed=3, augment=augment)(1)[1]
    assert all(len(c.split()) == 5 + 3 for c in captions) and len(set(captions)) == 4
    with pytest.raises(InputError):
        FinetuneSettings(model="m", data="d", caption_aug="shuffle").check()
