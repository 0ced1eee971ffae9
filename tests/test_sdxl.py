"""SDXL: loading, every detector, the monitor, explanation, the guard and the embedding mitigation, each on a tiny
random SDXL pipeline (two text encoders, pooled embeddings, time ids, Euler) against a hand-written reference."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.base import initial_noise
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.monitor import Monitor
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.errors import InputError, ModelLoadError
from diffmem.explanation.attribution import explain, gradient_significance
from diffmem.mitigate import generate, guarded_generate, mitigate_embedding
from diffmem.models.conditioning import empty, encode
from diffmem.models.loading import load_pipeline

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' Euler hands numpy a tensor without the `copy` keyword numpy 2 expects
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
REL = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_pipeline("sdxl")` saved as a diffusers folder."""
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.tiny import tiny_pipeline

    quiet_diffusers()
    folder = tmp_path_factory.mktemp("models") / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def xl(sdxl_dir: Path):
    """The tiny SDXL pipeline loaded back with `load_pipeline`, as a user loads SDXL base."""
    pipe = load_pipeline(sdxl_dir, device="cpu")
    MagnitudeDetector(pipe).score(["warm-up"])
    return pipe


class Hand:
    """METHOD.md by hand for SDXL: diffusers' own `encode_prompt` (zeros for the empty prompt), time ids written
    out, unbatched UNet calls, a fresh Euler scheduler (epsilon prediction: no conversion)."""

    def __init__(self, pipe, prompt: str, steps: int = 50) -> None:
        self.pipe = pipe
        cond, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True)
        ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])  # 8x8 latents x VAE factor 4, no crop
        self.cond = dict(encoder_hidden_states=cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        self.uncond = dict(encoder_hidden_states=neg, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": ids})
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(steps)

    def eps(self, x: torch.Tensor, t: torch.Tensor, unet=None, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        """(eps_c, eps_u) at input x and timestep t."""
        unet = unet or self.pipe.unet
        cast = {k: v.to(dtype) for k, v in self.cond["added_cond_kwargs"].items()}
        cast_u = {k: v.to(dtype) for k, v in self.uncond["added_cond_kwargs"].items()}
        c = unet(x, t, encoder_hidden_states=self.cond["encoder_hidden_states"].to(dtype), added_cond_kwargs=cast)
        u = unet(x, t, encoder_hidden_states=self.uncond["encoder_hidden_states"].to(dtype), added_cond_kwargs=cast_u)
        return c.sample, u.sample

    @torch.no_grad()
    def magnitudes(self, seed: int, n_steps: int, guidance: float = 7.5) -> list[float]:
        """`d_t` over the first n_steps of a plain CFG Euler loop from the noise of `seed`."""
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * self.scheduler.init_noise_sigma
        out = []
        for t in self.scheduler.timesteps[:n_steps]:
            eps_c, eps_u = self.eps(self.scheduler.scale_model_input(x, t), t)
            out.append(float((eps_c - eps_u).norm()))
            x = self.scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        return out

    def noise(self, seed: int) -> torch.Tensor:
        """The first step's denoiser input: Euler's scaling of init_noise_sigma * noise is exactly the noise."""
        return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_loads_as_sdxl_and_encodes_as_diffusers_does(xl) -> None:
    assert type(xl).__name__ == "StableDiffusionXLPipeline"
    hand = Hand(xl, PROMPTS[0])
    cond = encode(xl, [PROMPTS[0]])
    assert torch.equal(cond.prompt_embeds, hand.cond["encoder_hidden_states"])
    assert torch.equal(cond.pooled_embeds, hand.cond["added_cond_kwargs"]["text_embeds"])
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    blank = empty(xl)  # force_zeros_for_empty_prompt: the pipeline guides against zeros, not against ""
    assert not blank.prompt_embeds.any() and not blank.pooled_embeds.any()
    assert encode(xl, [""]).prompt_embeds.abs().sum() > 0


def test_without_force_zeros_the_empty_prompt_is_encoded(xl) -> None:
    xl.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, neg, _, neg_pooled = xl.encode_prompt("x", device="cpu", do_classifier_free_guidance=True)
        blank = empty(xl)
    finally:
        xl.register_to_config(force_zeros_for_empty_prompt=True)
    assert torch.equal(blank.prompt_embeds, neg) and torch.equal(blank.pooled_embeds, neg_pooled)


def test_first_step_score(xl) -> None:
    results = MagnitudeDetector(xl, generations=2, seed=3).score(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        hand = [Hand(xl, prompt).magnitudes(3 + g, 1)[0] for g in range(2)]
        assert [m[0] for m in res.magnitudes] == pytest.approx(hand, rel=REL)
        assert res.score == pytest.approx(sum(hand) / 2, rel=REL)


def test_all_steps_follow_the_guided_euler_trajectory(xl) -> None:
    res = MagnitudeDetector(xl, steps="all", num_inference_steps=STEPS, guidance_scale=5.0).score(PROMPTS[:1])[0]
    hand = Hand(xl, PROMPTS[0], STEPS).magnitudes(0, STEPS, guidance=5.0)
    assert res.magnitudes[0] == pytest.approx(hand, rel=REL)


def test_anisotropy(xl) -> None:
    res = AnisotropyDetector(xl, generations=1, seed=1, cosine_weight=2.0).score(PROMPTS[:1])[0]
    hand = Hand(xl, PROMPTS[0])
    x = hand.noise(1)
    with torch.no_grad():
        eps_c, eps_u = hand.eps(x, hand.scheduler.timesteps[0])
        d = float((eps_c - eps_u).norm())
        eps_c, eps_u = hand.eps(x, hand.scheduler.timesteps[-3])
    diff = eps_c - eps_u
    cos = float(((eps_u * diff).sum(dim=1) / (eps_u.norm(dim=1) * diff.norm(dim=1))).mean())
    assert res.magnitudes == [[pytest.approx(d, rel=REL)]]
    assert res.terms == [pytest.approx(cos, rel=1e-3, abs=1e-5)]
    assert res.score == pytest.approx(d + 2.0 * cos, rel=1e-4)


def test_sharpness_by_finite_difference(xl) -> None:
    import copy

    res = SharpnessDetector(xl, seed=2).score(PROMPTS[:1])[0]
    hand = Hand(xl, PROMPTS[0])
    unet = copy.deepcopy(xl.unet).double()
    t = hand.scheduler.timesteps[0]
    sigma = float(1 - xl.scheduler.alphas_cumprod[int(t)]) ** 0.5

    def s_delta(x: torch.Tensor) -> torch.Tensor:
        eps_c, eps_u = hand.eps(x, t, unet, torch.float64)
        return -(eps_c - eps_u) / sigma

    with torch.no_grad():
        x = hand.noise(2).double()
        v = s_delta(x)
        h = 1e-4 / float(v.norm())
        expected = float(((s_delta(x + h * v) - s_delta(x - h * v)) / (2 * h)).pow(2).sum())
    assert res.terms == [pytest.approx(expected, rel=2e-3)]


def test_monitor_reads_the_pipelines_own_cfg_batch(xl) -> None:
    latents = torch.cat([initial_noise(xl, 2, 0)] * 2)
    call = dict(num_images_per_prompt=2, latents=latents, num_inference_steps=STEPS, output_type="np",
                guidance_scale=5.0)  # SDXL's own default, which diffmem takes for an SDXL pipeline
    before = xl(PROMPTS, **call).images
    with Monitor(xl) as monitor:
        during = xl(PROMPTS, **call).images
    assert np.array_equal(before, during)
    expected = MagnitudeDetector(xl, steps="all", generations=2, num_inference_steps=STEPS).score(PROMPTS)
    assert monitor.scores(2, "all").tolist() == pytest.approx([r.score for r in expected], rel=REL)
    hand = Hand(xl, PROMPTS[1], STEPS).magnitudes(1, STEPS, guidance=5.0)  # prompt 1, generation 1: row 3
    assert monitor.magnitudes()[3].tolist() == pytest.approx(hand, rel=REL)


def test_gradient_explanation(xl) -> None:
    per_pos, score = gradient_significance(xl, PROMPTS[0], generations=2, seed=1)
    assert score == pytest.approx(MagnitudeDetector(xl, generations=2, seed=1).score(PROMPTS[:1])[0].score, rel=REL)
    # the gradient against the conditioning by hand, at one position, through diffusers' own embeddings
    hand = Hand(xl, PROMPTS[0])
    e = hand.cond["encoder_hidden_states"].detach().requires_grad_(True)
    t = hand.scheduler.timesteps[0]
    losses = []
    for g in range(2):
        x = hand.noise(1 + g)
        kwargs = hand.cond["added_cond_kwargs"]
        eps_c = xl.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=kwargs).sample
        with torch.no_grad():
            eps_u = xl.unet(x, t, **hand.uncond).sample
        losses.append((eps_c - eps_u).norm())
    (grad,) = torch.autograd.grad(sum(losses) / 2, e)
    assert per_pos.tolist() == pytest.approx(grad[0].norm(dim=-1).tolist(), rel=1e-3, abs=1e-7)
    attr = explain(xl, PROMPTS[0], method="gradient")
    assert [w.text for w in attr.words] == PROMPTS[0].split()
    assert attr.score == pytest.approx(MagnitudeDetector(xl).score(PROMPTS[:1])[0].score, rel=REL)


def test_embedding_mitigation_moves_both_embeddings(xl) -> None:
    res = mitigate_embedding(xl, PROMPTS[0], generations=2, seed=3, target_loss=-math.inf, iters=3)
    hand = [Hand(xl, PROMPTS[0]).magnitudes(3 + g, 1)[0] for g in range(2)]
    assert res.initial_loss == pytest.approx(np.mean(hand), rel=REL) and res.final_loss < res.initial_loss
    original = encode(xl, [PROMPTS[0]])
    assert res.conditioning is not None and torch.equal(res.embedding, res.conditioning.prompt_embeds)
    assert torch.equal(res.embedding[:, 0], original.prompt_embeds[:, 0])  # BOS stays
    assert not torch.equal(res.conditioning.pooled_embeds, original.pooled_embeds)
    assert all(p.grad is None for p in xl.unet.parameters())


def test_guard_on_sdxl(xl) -> None:
    settings = dict(num_inference_steps=STEPS, target_loss=0.0, iters=2, generations=2)
    call = dict(latents=initial_noise(xl, 2, 0), num_inference_steps=STEPS, output_type="np", guidance_scale=5.0)
    plain = [xl(p, num_images_per_prompt=2, **call).images for p in PROMPTS]
    kept = guarded_generate(xl, PROMPTS, threshold=math.inf, **settings)
    assert all(np.array_equal(a, b) for a, b in zip(kept.images, plain, strict=True))  # unflagged: bit for bit
    flagged = guarded_generate(xl, PROMPTS[:1], threshold=-math.inf, **settings)
    d = flagged.decisions[0]
    assert (d.flagged, d.mitigated, d.iters, d.reached) == (True, True, 2, False)
    res = mitigate_embedding(xl, PROMPTS[0], generations=2, target_loss=0.0, iters=2, num_inference_steps=STEPS)
    assert res.conditioning is not None
    by_hand = xl(**res.conditioning.pipe_kwargs(empty(xl)), num_images_per_prompt=2, **call).images
    assert np.array_equal(flagged.images[0], by_hand) and not np.array_equal(flagged.images[0], plain[0])


def test_baselines_generate_on_sdxl(xl) -> None:
    base = generate(xl, PROMPTS[:1], "none", num_inference_steps=2).images[0]
    for method in ("gni", "rta"):
        out = generate(xl, PROMPTS[:1], method, num_inference_steps=2)
        assert out.images[0].shape == base.shape and not np.array_equal(out.images[0], base)
    with pytest.raises(InputError, match="Conditioning"):
        MagnitudeDetector(xl).magnitudes(encode(xl, ["a"]).prompt_embeds)


def _with_class(good: Path, dest: Path, name: str) -> Path:
    shutil.copytree(good, dest)
    index = dest / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": name}))
    return dest


def test_other_pipeline_classes_are_one_line_errors(sdxl_dir: Path, tmp_path: Path, cli: Callable) -> None:
    folder = _with_class(sdxl_dir, tmp_path / "img2img", "StableDiffusionXLImg2ImgPipeline")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(folder, device="cpu")
    message = str(info.value)
    assert "StableDiffusionXLImg2ImgPipeline" in message and "StableDiffusionXLPipeline" in message
    assert "\n" not in message
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = cli("detect", "--model", folder, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.output


def test_cli_detect_on_sdxl(sdxl_dir: Path, xl, tmp_path: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = cli("detect", "--model", sdxl_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    expected = MagnitudeDetector(xl).score(PROMPTS)
    assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], rel=REL)
