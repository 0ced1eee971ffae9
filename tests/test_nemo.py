"""NeMo: MS-SSIM against an independent (scipy) reference, the residual-SSIM detector against a hand-written
computation, neuron statistics, deactivation hooks, localisation, the mitigation and `explain --neurons`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from diffmem.detectors import NemoDetector
from diffmem.detectors.base import initial_noise
from diffmem.errors import InputError
from diffmem.measures.ssim import ms_ssim, scales_for
from diffmem.mitigate import generate
from diffmem.mitigate.nemo import NeuronStatistics, deactivated, localize, value_layers

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]


def ssim_reference(a: np.ndarray, b: np.ndarray, size: int) -> tuple[float, float]:
    """SSIM and contrast-structure of two (C, H, W) images by scipy convolution: reflect padding, the padded border
    cropped, mean over channels and pixels."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (x / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    pad = size // 2
    sims, css = [], []
    for ca, cb in zip(a, b, strict=True):

        def blur(z: np.ndarray) -> np.ndarray:
            out = convolve2d(np.pad(z, pad, mode="reflect"), w[::-1, ::-1], mode="valid")
            return out[pad : out.shape[0] - pad, pad : out.shape[1] - pad] if pad else out

        mx, my = blur(ca), blur(cb)
        vx, vy, cov = blur(ca * ca) - mx**2, blur(cb * cb) - my**2, blur(ca * cb) - mx * my
        cs = (2 * cov + 0.03**2) / (vx + vy + 0.03**2)
        sims.append(((2 * mx * my + 0.01**2) / (mx**2 + my**2 + 0.01**2) * cs).mean())
        css.append(cs.mean())
    return float(np.mean(sims)), float(np.mean(css))


def ms_ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    weights, size = scales_for(min(a.shape[-2:]))
    value = 1.0
    for j, beta in enumerate(weights):
        sim, cs = ssim_reference(a, b, size)
        value *= max(sim if j == len(weights) - 1 else cs, 0.0) ** beta
        a = a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(2, 4))
        b = b.reshape(b.shape[0], b.shape[1] // 2, 2, b.shape[2] // 2, 2).mean(axis=(2, 4))
    return value


@pytest.mark.parametrize("side", [8, 64])
def test_ms_ssim_matches_a_scipy_reference(side: int) -> None:
    gen = torch.Generator().manual_seed(side)
    a = torch.rand(3, 4, side, side, generator=gen)
    b = (a + 0.3 * torch.rand(3, 4, side, side, generator=gen)).clamp(0, 1)
    got = ms_ssim(a, b)
    for i in range(3):
        assert float(got[i]) == pytest.approx(ms_ssim_reference(a[i].double().numpy(), b[i].double().numpy()),
                                              rel=1e-9)
    assert ms_ssim(a, a).tolist() == pytest.approx([1.0] * 3)
    assert scales_for(64) == ((0.33, 0.33, 0.33), 11)  # NeMo's three scales and window on SD's 64x64 latents
    assert scales_for(8)[0] == pytest.approx((0.99,)) and scales_for(8)[1] == 7


def test_nemo_score_is_the_highest_residual_ssim_across_seeds(pipe, reference) -> None:
    n = 3
    results = NemoDetector(pipe, generations=n, seed=2, num_inference_steps=50).score(PROMPTS)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[1]  # the authors' loop evaluates the second timestep on x_T
    for prompt, res in zip(PROMPTS, results, strict=True):
        cond, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        residuals = []
        for g in range(n):
            x = reference.noise(2 + g)
            with torch.no_grad():
                pred = pipe.unet(x, t, encoder_hidden_states=cond).sample
            if scheduler.config.prediction_type == "v_prediction":
                abar = float(scheduler.alphas_cumprod[int(t)])
                pred = abar**0.5 * pred + (1 - abar) ** 0.5 * x
            d = (pred - x)[0].double().numpy()
            lo, hi = d.min(axis=(1, 2), keepdims=True), d.max(axis=(1, 2), keepdims=True)
            residuals.append((d - lo) / (hi - lo))
        sims = [[ms_ssim_reference(residuals[i], residuals[j]) for j in range(n) if j != i] for i in range(n)]
        hand = [max(row) for row in sims]
        assert res.terms == pytest.approx(hand, rel=1e-4, abs=1e-5)
        assert res.score == pytest.approx(max(hand), rel=1e-4, abs=1e-5)
        assert res.timesteps == [float(t)]
    with pytest.raises(InputError, match="at least 2"):
        NemoDetector(pipe, generations=1)


def test_neuron_statistics_are_the_mean_absolute_value_activations(sd1_pipe) -> None:
    prompts = ["a cat", "a dog on the grass", "a red car"]
    stats = NeuronStatistics.fit(sd1_pipe, prompts, batch_size=2)
    cond, _ = sd1_pipe.encode_prompt(prompts, "cpu", 1, False)
    for layer, attn in enumerate(value_layers(sd1_pipe.unet)):
        with torch.no_grad():
            act = attn.to_v(cond).abs().mean(dim=1)
        torch.testing.assert_close(stats.mean[layer], act.mean(dim=0))
        torch.testing.assert_close(stats.std[layer], act.std(dim=0))


def test_deactivated_neurons_output_zero_and_hooks_go_away(sd1_pipe) -> None:
    layer = value_layers(sd1_pipe.unet)[0].to_v
    x = torch.randn(1, 77, 32)
    with deactivated(sd1_pipe.unet, [[1, 3], []]):
        out = layer(x)
    assert torch.equal(out[..., [1, 3]], torch.zeros(1, 77, 2)) and bool(out[..., 0].abs().sum() > 0)
    assert not layer._forward_hooks
    assert torch.equal(layer(x)[..., 1], torch.nn.functional.linear(x, layer.weight, layer.bias)[..., 1])


def test_localized_neurons_make_the_residuals_dissimilar(sd1_pipe) -> None:
    stats = NeuronStatistics.fit(sd1_pipe, ["a cat", "a dog on the grass", "a red car", "a house"])
    # The tiny model memorizes nothing; a threshold below its residual similarity makes NeMo look anyway.
    found = localize(sd1_pipe, PROMPTS[0], stats, generations=3, threshold=0.05, num_inference_steps=10)
    assert found.memorized and found.count > 0 and found.seeds
    assert found.refined_ssim is not None and found.initial_ssim is not None
    assert all(set(r) <= set(i) for r, i in zip(found.neurons, found.initial, strict=True))  # refining only removes
    nothing = localize(sd1_pipe, PROMPTS[0], stats, generations=3, threshold=1.01, num_inference_steps=10)
    assert not nothing.memorized and nothing.count == 0


def test_nemo_mitigation_generates_with_the_neurons_off(sd1_pipe) -> None:
    options = {"nemo_threshold": 0.05, "nemo_generations": 3}
    out = generate(sd1_pipe, PROMPTS[:1], "nemo", generations=2, num_inference_steps=3, method_options=options)
    details = out.decisions[0].details
    assert details is not None and details["count"] > 0
    noise = initial_noise(sd1_pipe, 2, 0)
    with deactivated(sd1_pipe.unet, details["neurons"]):
        expected = sd1_pipe(PROMPTS[0], num_images_per_prompt=2, latents=noise, num_inference_steps=3,
                            output_type="np").images
    assert np.array_equal(out.images[0], expected)
    # Not memorized by NeMo's test: the images are the plain pipeline's, bit for bit.
    plain = generate(sd1_pipe, PROMPTS[:1], "nemo", generations=2, num_inference_steps=3,
                     method_options={"nemo_threshold": 1.01, "nemo_generations": 3})
    base = sd1_pipe(PROMPTS[0], num_images_per_prompt=2, latents=noise, num_inference_steps=3, output_type="np").images
    assert np.array_equal(plain.images[0], base) and plain.decisions[0].details["memorized"] is False


def test_explain_neurons_cli(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    stats = tmp_path / "stats.pt"
    NeuronStatistics.fit(sd1_pipe, ["a cat", "a dog on the grass", "a red car"]).save(stats)
    result = cli("explain", "--model", sd1_dir, "--neurons", "--nemo-stats", stats, "--json", PROMPTS[0])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["memorized"] in (True, False) and len(found["neurons"]) == len(found["layers"]) == 2
    bad = cli("explain", "--model", sd1_dir, "--neurons", "--nemo-stats", tmp_path / "nope.pt", PROMPTS[0])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.output
