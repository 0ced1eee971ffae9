"""`diffmem train` on a flow-matching model (SD3): the flow loss, checkpoint and exact resume, calibration and the
magnitude filter at the first sampling step through the detector's score (`to_score`), on a tiny SD3 folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny
from diffmem.errors import UnsupportedModelError
from diffmem.models.conditioning import empty, encode
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.models.loading import load_pipeline
from diffmem.training.finetune import FinetuneSettings, calibrate, finetune
from diffmem.training.loop import FlowObjective, _filter
from test_flow_models import tiny_pixart, tiny_sd3

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red cube on a wooden table", "portrait of a smiling old man", "a blue cat", "photo of a dog"]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory, tiny_sd3, "flow-train", "sd3")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four random 16x16 images (the tiny SD3's resolution) with captions."""
    folder = tmp_path_factory.mktemp("flow-data")
    for i, caption in enumerate(CAPTIONS):
        pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def _settings(model: Path, data: Path, **kw) -> FinetuneSettings:
    return FinetuneSettings(str(model), str(data), **{"steps": 4, "batch_size": 2, "lr": 1e-3, **kw})


def test_flow_objective_noises_targets_and_filters_at_the_first_step(sd3_dir: Path) -> None:
    """x_t = (1 - s) x0 + s eps, v = eps - x0; at the first step (s = 1) the filter's d is the detector's
    `|| v(eps, caption) - v(eps, '') ||` on the noise alone."""
    pipe = load_pipeline(sd3_dir, device="cpu")
    obj, net = FlowObjective(pipe), pipe.transformer
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = obj.timesteps(2, torch.Generator().manual_seed(0))
    assert all(float(v) in obj.train_timesteps.tolist() for v in t)
    s = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(obj.noisy(x0, eps, t), (1 - s) * x0 + s * eps)
    assert torch.equal(obj.target(x0, eps, t), eps - x0)
    first = obj.first_timestep()
    assert first == 1000 and torch.equal(obj.noisy(x0, eps, torch.full((2,), first)), eps)
    cond = encode(pipe, CAPTIONS[:2])
    with torch.no_grad():
        d = _filter(obj, net, first, x0, None, t, None, cond, torch.Generator().manual_seed(3), slice(0, None), 2)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        tf = torch.tensor(1000.0)
        denoiser, param = Denoiser(pipe), Parameterization.of(pipe.scheduler)
        v_c, v_u = denoiser.cfg(noise, tf, cond, empty(pipe).expand(2))
        want = (param.to_score(v_c, noise, tf) - param.to_score(v_u, noise, tf)).flatten(1).norm(dim=1)
    torch.testing.assert_close(d, want)


def test_train_checkpoint_and_resume_exactly(sd3_dir: Path, data: Path, tmp_path: Path) -> None:
    settings = _settings(sd3_dir, data)
    straight = finetune(settings, tmp_path / "a", checkpoint_every=2, log_every=1)
    base = load_pipeline(sd3_dir, device="cpu").transformer
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), straight.pipe.transformer.parameters(),
                                                       strict=True))
    assert (tmp_path / "a" / "pipeline" / "transformer").is_dir()
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # frozen
        assert all(not p.requires_grad for p in getattr(straight.pipe, part).parameters())
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in logs)

    def crash(step: int, record: dict) -> None:
        if step == 3:  # after step 3 ran, before its checkpoint: like a kill
            raise Crash

    with pytest.raises(Crash):
        finetune(settings, tmp_path / "b", checkpoint_every=2, log_every=1, progress=crash)
    resumed = finetune(settings, tmp_path / "b", resume=True, checkpoint_every=2, log_every=1)
    assert resumed.stats["resumed_from"] == 2
    for a, b in zip(straight.pipe.transformer.parameters(), resumed.pipe.transformer.parameters(), strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def test_calibrate_suggests_a_tau_and_the_filter_drops_samples_above_it(sd3_dir: Path, data: Path,
                                                                        tmp_path: Path) -> None:
    result = calibrate(_settings(sd3_dir, data), tmp_path / "cal", measurements=16)
    assert result["filter_at"] == "first-step" and result["measurements"] == 16
    tau = result["suggested_tau"]
    assert math.isfinite(tau) and tau > 0 and tau == result["percentiles"]["99"]
    median = result["percentiles"]["50"]
    run = finetune(_settings(sd3_dir, data, filter_threshold=median), tmp_path / "median", log_every=1)
    logs = [json.loads(line) for line in (tmp_path / "median" / "log.jsonl").read_text().splitlines()]
    assert 0 < sum(r["excluded_samples"] for r in logs) < 8  # samples above the median dropped, not all
    base = load_pipeline(sd3_dir, device="cpu").transformer
    none = finetune(_settings(sd3_dir, data, steps=2, filter_threshold=0.0), tmp_path / "zero")
    assert none.stats["skipped_steps"] == 2 and none.stats["excluded_share"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), none.pipe.transformer.parameters(), strict=True))
    assert run.stats["skipped_steps"] < 4


def test_train_refuses_pixart_in_one_line(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pixart"
    tiny_pixart().save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="not PixArt") as info:
        finetune(_settings(folder, data, steps=1), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_sd3_without_t5_trains_on_one_row_standing_for_its_rows_of_zeros() -> None:
    """SD3 without T5 conditions on 256 rows of zeros after the CLIP tokens; the objective trains on one row with
    the weight of all (`repeated_context_token`): the prediction and its gradient are those of the whole context."""
    from diffusers import StableDiffusion3Pipeline

    full = tiny_sd3()
    pipe = StableDiffusion3Pipeline(**{**full.components, "text_encoder_3": None, "tokenizer_3": None})
    obj, net = FlowObjective(pipe), pipe.transformer
    assert obj.copies == 256 and FlowObjective(full).copies == 0
    cond, whole = obj.encode(CAPTIONS[:2], "cpu"), encode(pipe, CAPTIONS[:2])
    assert cond.prompt_embeds.shape[1] == whole.prompt_embeds.shape[1] - 255
    assert not whole.prompt_embeds[:, -256:].any()  # what the one row stands for: zeros
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1000.0, 300.0])
    compact = obj.predict(net, x, t, cond)
    compact.square().sum().backward()
    grad = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    stock = Denoiser(pipe).predict(x, t, whole)
    stock.square().sum().backward()
    torch.testing.assert_close(compact, stock, rtol=1e-4, atol=1e-5)
    for a, p in zip(grad, net.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-5)
    assert type(next(iter(net.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"  # restored


def test_collapsed_t5_rows_gives_the_pipelines_scores_and_images_faster() -> None:
    """The testbed's evaluations run SD3 without T5 with its rows of zeros as one (exact): the detector's scores
    and a plain call's images match the pipeline's own; a pipeline with T5 is left as it is; all is restored."""
    from diffusers import StableDiffusion3Pipeline

    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.detectors.monitor import Monitor
    from diffmem.models.attention import collapsed_t5_rows
    from diffmem.models.denoiser import initial_noise

    full = tiny_sd3()
    pipe = StableDiffusion3Pipeline(**{**full.components, "text_encoder_3": None, "tokenizer_3": None})
    pipe.set_progress_bar_config(disable=True)

    def run() -> tuple[list[float], np.ndarray]:
        scores = [r.score for r in MagnitudeDetector(pipe, generations=2, num_inference_steps=4, steps="all")
                  .score(CAPTIONS[:2])]
        images = pipe(CAPTIONS[:2], latents=initial_noise(pipe, 1, 0).repeat(2, 1, 1, 1), num_inference_steps=3,
                      height=16, width=16, output_type="np").images
        return scores, images

    stock = run()
    with collapsed_t5_rows(pipe) as collapsed:
        assert collapsed and pipe.encode_prompt(CAPTIONS[:1], None, None)[0].shape[1] == 77 + 1
        with Monitor(pipe) as monitor:  # a monitor inside puts back the wrapper it shadowed
            pipe(CAPTIONS[0], num_inference_steps=2, height=16, width=16, num_images_per_prompt=2)
        assert monitor.scores(steps="first").shape == (1,)  # it read n = 2 through the wrapper's signature
        assert pipe.encode_prompt(CAPTIONS[:1], None, None)[0].shape[1] == 77 + 1
        fast = run()
    assert fast[0] == pytest.approx(stock[0], rel=1e-4)
    np.testing.assert_allclose(fast[1], stock[1], atol=1e-4)
    assert pipe.encode_prompt(CAPTIONS[:1], None, None)[0].shape[1] == 77 + 256  # restored
    assert type(next(iter(pipe.transformer.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"
    with collapsed_t5_rows(full) as collapsed:
        assert not collapsed and "encode_prompt" not in vars(full)
