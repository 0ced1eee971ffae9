"""Detectors that read an ordinary generation (step-norm, Carlini) against hand-written references, the monitor's
update norms, and every new detector through `diffmem detect` (rows, resume, errors)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.detectors import CarliniDetector, StableRange, StepNormDetector
from diffmem.detectors.base import initial_noise
from diffmem.detectors.carlini import cluster_radius, tiled_distance
from diffmem.detectors.monitor import Monitor
from diffmem.errors import InputError
from diffmem.io.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
STEPS = 5


def latent_trajectory(pipe, prompt: str, latent: torch.Tensor, steps: int, guidance: float = 7.5) -> list:
    """The latents of a plain CFG loop (DDIM: the denoiser's inputs), x_T first."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    xs = [latent.clone()]
    with torch.no_grad():
        for t in scheduler.timesteps:
            c = pipe.unet(xs[-1], t, encoder_hidden_states=cond).sample
            u = pipe.unet(xs[-1], t, encoder_hidden_states=uncond).sample
            xs.append(scheduler.step(u + guidance * (c - u), t, xs[-1]).prev_sample)
    return xs


def test_monitor_reads_each_latent_update(pipe, reference) -> None:
    with Monitor(pipe) as monitor:
        pipe(PROMPTS[0], latents=reference.noise(0), num_inference_steps=STEPS, output_type="latent")
    xs = latent_trajectory(pipe, PROMPTS[0], reference.noise(0), STEPS)
    hand = [float((xs[k + 1] - xs[k]).norm()) for k in range(STEPS - 1)]
    assert monitor.update_norms()[0].tolist() == pytest.approx(hand, rel=1e-4)


def test_step_norm_scores_the_largest_excursion_from_the_stable_range(pipe, reference) -> None:
    raw = StepNormDetector(pipe, generations=2, num_inference_steps=STEPS).score(PROMPTS)
    for prompt, res in zip(PROMPTS, raw, strict=True):
        hand = [[float((x1 - x0).norm()) for x0, x1 in zip(xs[:-2], xs[1:-1], strict=True)]
                for xs in (latent_trajectory(pipe, prompt, reference.noise(g), STEPS) for g in range(2))]
        assert res.magnitudes == [pytest.approx(h, rel=1e-4) for h in hand]
        assert res.score == pytest.approx(np.mean([max(h) for h in hand]), rel=1e-4)
    band = StableRange.fit([g for r in raw for g in r.magnitudes], quantiles=(0.25, 0.75))
    fitted = StepNormDetector(pipe, generations=2, num_inference_steps=STEPS, stable_range=band).score(PROMPTS)
    lo, hi = np.array(band.lo), np.array(band.hi)
    for res, base in zip(fitted, raw, strict=True):
        u = np.array(base.magnitudes)
        hand = (np.maximum(u - hi, lo - u) / (hi - lo)).max(axis=1)
        assert res.terms == pytest.approx(hand.tolist(), rel=1e-6) and res.score == pytest.approx(hand.mean())
    assert StableRange.from_rows([r.to_dict() for r in raw]) == StableRange.fit([g for r in raw for g in r.magnitudes])


def test_tiled_distance_is_the_largest_tile_rms_difference() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 16, 16, 3, generator=gen, dtype=torch.float64)
    d = tiled_distance(a)
    for i in range(3):
        for j in range(3):
            tiles = [float(((a[i, r:r + 4, c:c + 4] - a[j, r:r + 4, c:c + 4]) ** 2).mean().sqrt())
                     for r in range(0, 16, 4) for c in range(0, 16, 4)]
            assert float(d[i, j]) == pytest.approx(max(tiles), rel=1e-9)
    assert cluster_radius(d, 2).tolist() == pytest.approx([min(float(d[i, j]) for j in range(3) if j != i)
                                                            for i in range(3)])


def test_carlini_scores_the_tightest_cluster_of_the_plain_generations(sd1_pipe) -> None:
    n = 3
    results = CarliniDetector(sd1_pipe, generations=n, cluster_size=2, num_inference_steps=3).score(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        images = sd1_pipe(prompt, num_images_per_prompt=n, latents=initial_noise(sd1_pipe, n, 0),
                          num_inference_steps=3, output_type="np").images
        d = tiled_distance(torch.from_numpy(images))
        hand = [min(float(d[i, j]) for j in range(n) if j != i) for i in range(n)]
        assert res.terms == pytest.approx(hand, rel=1e-4, abs=1e-6)
        assert res.score == pytest.approx(-min(hand), rel=1e-4, abs=1e-6)
    with pytest.raises(InputError, match="at least 2"):
        CarliniDetector(sd1_pipe, generations=1)


@pytest.mark.parametrize("name", ["ren-le", "ren-ae", "bright-ending", "nemo", "step-norm", "carlini"])
def test_detect_cli_runs_each_new_detector_and_resumes(name: str, tmp_path: Path, sd1_dir: Path, sd1_pipe,
                                                       cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "s.jsonl"
    args = ["detect", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--detector", name,
            "--generations", 2, "--num-inference-steps", 4]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["detector"] == name and r["score"] is not None
                                                          for r in rows)
    assert rows[0]["steps"] == (4 if name == "bright-ending" else 1) and len(rows[0]["terms"]) == 2
    again = cli(*args)
    assert again.exit_code == 0 and "scored 0 prompts" in again.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (["--detector", "ren-le", "--steps", "all"], "--steps applies to the wen and bright-ending"),
    (["--detector", "carlini"], "--generations must be at least 2"),
    (["--detector", "wen", "--stable-range", "band.json"], "--stable-range applies to the step-norm"),
    (["--detector", "step-norm", "--stable-range", "missing.json"], "not a stable range file"),
])
def test_detect_cli_user_errors(args: list, fragment: str, tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    (tmp_path / "band.json").write_text('{"lo": [0], "hi": [1]}')
    args = [tmp_path / a if str(a).endswith(".json") else a for a in args]
    result = cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", tmp_path / "s.jsonl", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error:") and fragment in last[0], result.stderr
