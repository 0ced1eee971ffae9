"""DeepFloyd IF stage I (pixel-space UNet over T5, learned variance, DDPM): loading a folder without a VAE, the
first-step score against the pipeline's own CFG branches, the monitor, generation from diffmem's noise bit for bit
as a plain call with the same seeds, the embedding mitigation, the refusals (later steps of diffmem's own loop,
CLIP-token attention methods), and `reproduce --dataset webster-deepfloyd-if` on a tiny random IF pipeline."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

from conftest import save_tiny
from diffmem.detectors.attention_entropy import AttentionEntropyDetector
from diffmem.detectors.magnitude import MagnitudeDetector, detect
from diffmem.detectors.monitor import Monitor
from diffmem.errors import ModelLoadError, UnsupportedModelError
from diffmem.mitigate.embedding import mitigate_embedding
from diffmem.mitigate.guard import generate
from diffmem.models.conditioning import encode, prompt_positions, text_window
from diffmem.models.defaults import FAMILY_GUIDANCE, ModelDefaults
from diffmem.models.denoiser import Denoiser, default_size, initial_noise
from diffmem.models.loading import load_pipeline
from test_datasets import Server, error_line, published
from test_flow_models import t5_encoder, t5_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
SIDE = 16
STEPS = 3


def tiny_if() -> IFPipeline:
    """IF stage I as diffusers builds it, tiny: a UNet on 16x16 pixels predicting noise and variance (6 channels),
    T5 states projected into its cross-attention (`text_proj`), IF's DDPM (cosine, learned range, thresholding)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIDE, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, encoder_hid_dim=32,
        encoder_hid_dim_type="text_proj", attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, norm_num_groups=8, resnet_time_scale_shift="scale_shift", act_fn="gelu")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                              sample_max_value=1.0, prediction_type="epsilon", variance_type="learned_range")
    return IFPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(4), unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory, tiny_if, "deepfloyd", "if")


@pytest.fixture(scope="module")
def pipe(if_dir: Path) -> Any:
    return load_pipeline(if_dir, device="cpu")


def _seeds(n: int, seed: int = 0) -> list[torch.Generator]:
    """The generators of a plain IF call that draws diffmem's `initial_noise(pipe, n, seed)`."""
    return [torch.Generator().manual_seed(seed + g) for g in range(n)]


@torch.no_grad()
def _branches(pipe: Any, prompt: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(eps_c, eps_u)` of each step of a plain call (its epsilon halves), read by a hook on the UNet."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: Any, args: tuple, output: Any) -> None:
        eps_u, eps_c = output[0][:, :3].chunk(2)
        seen.append((eps_c.clone(), eps_u.clone()))

    handle = pipe.unet.register_forward_hook(hook)
    try:
        pipe(PROMPTS[0] if prompt is None else prompt, num_images_per_prompt=n, generator=_seeds(n),
             num_inference_steps=STEPS, output_type="np")
    finally:
        handle.remove()
    return seen


def test_loads_a_folder_without_a_vae_with_its_family_defaults(pipe: Any, if_dir: Path) -> None:
    assert type(pipe).__name__ == "IFPipeline" and getattr(pipe, "vae", None) is None
    defaults = ModelDefaults.of(pipe)
    assert defaults.guidance_scale == FAMILY_GUIDANCE["IFPipeline"] == 7.0  # IFPipeline.__call__'s default
    assert defaults.resolution == SIDE == default_size(pipe)  # pixels: no VAE factor
    assert tuple(initial_noise(pipe, 2, 0).shape) == (2, 3, SIDE, SIDE)
    assert text_window(pipe)[1] == 76 and prompt_positions(pipe) == [(pipe.tokenizer, 0, 76)]
    assert encode(pipe, PROMPTS).prompt_embeds.shape == (2, 77, 32)  # IF's fixed T5 length
    broken = if_dir.parent / "no-unet"
    shutil.copytree(if_dir, broken, dirs_exist_ok=True)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": [None, None]}))
    with pytest.raises(ModelLoadError, match="missing unet"):
        load_pipeline(broken, device="cpu")


def test_first_step_score_is_the_pipelines_own_cfg_branches(pipe: Any) -> None:
    """`d_T = ||eps_c - eps_u||` over the image's pixels, from the noise a plain call with seeds 0..n-1 draws."""
    n = 2
    eps_c, eps_u = _branches(pipe, PROMPTS[0], n)[0]
    by_hand = (eps_c - eps_u).flatten(1).norm(dim=1).mean()
    score = detect(pipe, [PROMPTS[0]], generations=n, num_inference_steps=STEPS)[0]
    assert score.score == pytest.approx(float(by_hand), rel=1e-4)
    assert score.score is not None and score.score > 0


def test_monitor_reads_every_step_of_a_plain_call_and_changes_nothing(pipe: Any) -> None:
    plain = pipe(PROMPTS, generator=_seeds(2), num_inference_steps=STEPS, output_type="np").images
    with Monitor(pipe) as monitor:
        watched = pipe(PROMPTS, generator=_seeds(2), num_inference_steps=STEPS, output_type="np").images
    assert np.array_equal(plain, watched)
    assert tuple(monitor.magnitudes().shape) == (2, STEPS)
    first = [detect(pipe, [p], generations=1, seed=g, num_inference_steps=STEPS)[0].score
             for g, p in enumerate(PROMPTS)]
    assert monitor.magnitudes()[:, 0].tolist() == pytest.approx(first, rel=1e-4)


def test_generation_starts_from_diffmems_noise_bit_for_bit(pipe: Any) -> None:
    """IF's call takes no latents: diffmem starts it from its noise, and that is exactly a seeded plain call."""
    result = generate(pipe, [PROMPTS[1]], "none", generations=2, num_inference_steps=STEPS)
    plain = pipe(PROMPTS[1], num_images_per_prompt=2, generator=_seeds(2), num_inference_steps=STEPS,
                 output_type="np").images
    assert np.array_equal(np.asarray(result.images[0]), plain)
    assert result.decisions[0].final_loss == pytest.approx(detect(pipe, [PROMPTS[1]], generations=2,
                                                                  num_inference_steps=STEPS)[0].score,
                                                           rel=1e-4)
    assert "prepare_intermediate_images" not in vars(pipe)  # the pipeline is left as it was


def test_embedding_mitigation_optimises_every_t5_position(pipe: Any) -> None:
    start = detect(pipe, [PROMPTS[0]], generations=1)[0].score
    result = mitigate_embedding(pipe, PROMPTS[0], target_loss=0.0, iters=3, lr=0.05, generations=1)
    assert start is not None and result.final_loss < start
    moved = (result.embedding - encode(pipe, [PROMPTS[0]]).prompt_embeds).abs().sum(-1)[0]
    assert bool(moved[0] > 0)  # T5 has no BOS to hold fixed


def test_later_steps_and_clip_attention_methods_are_one_line_refusals(pipe: Any) -> None:
    with pytest.raises(UnsupportedModelError, match="learned variance"):
        MagnitudeDetector(pipe, steps="all", num_inference_steps=STEPS).score(PROMPTS[:1])
    with pytest.raises(UnsupportedModelError, match="learned variance"):
        Denoiser(pipe).check_steps(2)
    reason = AttentionEntropyDetector.unsupported(pipe)
    assert reason is not None and "DeepFloyd IF" in reason and "T5" in reason


def test_cli_detect_and_the_steps_refusal(if_dir: Path, tmp_path: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "scores.jsonl"
    result = cli("detect", "--model", if_dir, "--prompts", prompts, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2
    line = error_line(cli("detect", "--model", if_dir, "--prompts", prompts, "--out", tmp_path / "b.jsonl",
                          "--steps", "all", "--device", "cpu", "--num-inference-steps", str(STEPS)))
    assert "learned variance" in line
    report = tmp_path / "report"  # reproduce's default steps include later ones: refused before any work
    line = error_line(cli("reproduce", "--model", if_dir, "--memorized", prompts, "--normal", prompts, "--out",
                          report, "--device", "cpu"))
    assert "--steps first" in line and not (report / "detection").exists()


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_reproduce_on_webster_deepfloyd_if(if_dir: Path, tmp_path: Path, cli: Callable) -> None:
    from diffmem.testbed.tiny import save_tiny_clip, save_tiny_sscd

    www = tmp_path / "www"
    www.mkdir()
    files = published(www)  # Webster's ground truth for SD v1, served again as IF's file of the same shape
    sdv1 = next(p for p in files if p.endswith("sdv1_bb_edge_groundtruth.parquet"))
    (www / "groundtruth_parquets" / "deep_if_sdv1_wb_groundtruth.parquet").write_bytes(files[sdv1])
    data = tmp_path / "data"
    with Server(www) as server:
        fetched = cli("datasets", "fetch", "webster-deepfloyd-if", "--out", data, "--base-url", server.url)
    assert fetched.exit_code == 0, fetched.output
    save_tiny_sscd(tmp_path / "sscd.pt")
    save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "report"
    result = cli("reproduce", "--dataset", "webster-deepfloyd-if", "--data", data, "--model", if_dir, "--out", out,
                 "--generations", 1, "--steps", "first", "--methods", "none,embedding", "--sscd",
                 tmp_path / "sscd.pt", "--clip", tmp_path / "clip", "--num-inference-steps", STEPS,
                 "--mitigation-generations", 2, "--iters", 1, "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["n_memorized"], report["settings"]["n_normal"]) == (3, 2)
    assert 0 <= report["detection"][0]["auc"] <= 1
    assert [row["method"] for row in report["mitigation"]] == ["none", "embedding"]
    images = sorted((out / "mitigation" / "none").glob("**/*.png"))
    assert images and all(np.asarray(__import__("PIL.Image").Image.open(p)).shape == (SIDE, SIDE, 3)
                          for p in images)


def test_compare_runs_every_detector_or_says_why_not(if_dir: Path, tmp_path: Path, cli: Callable) -> None:
    mem, normal = tmp_path / "mem.txt", tmp_path / "normal.txt"
    mem.write_text("\n".join(PROMPTS) + "\n")
    normal.write_text("a cat\na dog on the table\nphoto of an old man\nthe red table\nan oil painting\n")
    out = tmp_path / "cmp"
    result = cli("compare", "--model", if_dir, "--memorized", mem, "--normal", normal, "--out", out,
                 "--num-inference-steps", STEPS, "--generations", 2, "--mitigation-prompts", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = {r["detector"]: r for r in json.loads((out / "report.json").read_text())["detection"]}
    assert len(rows) == 9 and rows["wen"]["auc"] is not None and rows["sharpness"]["auc"] is not None
    for name in ("ren-le", "ren-ae", "bright-ending", "nemo"):
        assert rows[name]["auc"] is None and "T5 tokens" in rows[name]["unsupported"]
    for name, row in rows.items():  # every other one scores, or says in one line why it cannot
        assert (row["auc"] is not None) != bool(row.get("unsupported")), (name, row)
