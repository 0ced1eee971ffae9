"""SAIL: its loss against a hand-written computation, the optimisation's stopping rule, bit-identical images when
no noise needs to move, and the method through `generate` and `diffmem mitigate`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.detectors.base import initial_noise
from diffmem.errors import InputError
from diffmem.io.results import read_results
from diffmem.mitigate import generate
from diffmem.mitigate.sail import SAIL_WEIGHT, sail

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cube on a wooden table"


def sail_loss_by_hand(pipe, prompt: str, x: torch.Tensor, weight: float = SAIL_WEIGHT) -> float:
    """The authors' proxy for one noise, with unbatched UNet calls and diffusers' own text encoding."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    abar = float(scheduler.alphas_cumprod[int(t)])

    def delta(z: torch.Tensor) -> torch.Tensor:
        c = pipe.unet(z, t, encoder_hidden_states=cond).sample
        u = pipe.unet(z, t, encoder_hidden_states=uncond).sample
        if scheduler.config.prediction_type == "v_prediction":
            c, u = abar**0.5 * c + (1 - abar) ** 0.5 * z, abar**0.5 * u + (1 - abar) ** 0.5 * z
        return c - u

    with torch.no_grad():
        d = delta(x)
        return float(delta(x + d / d.norm()).norm() + weight * x.norm())


def test_initial_loss_is_the_authors_proxy(pipe, reference) -> None:
    res = sail(pipe, PROMPT, generations=2, seed=3, threshold=math.inf)
    hand = [sail_loss_by_hand(pipe, PROMPT, reference.noise(3 + g)) for g in range(2)]
    assert res.initial_losses == pytest.approx(hand, rel=1e-4)
    assert res.losses == res.initial_losses and (res.iters, res.reached) == (0, True)
    assert torch.equal(res.noise, initial_noise(pipe, 2, 3))  # nothing to move: the noise itself


def test_noise_moves_until_the_threshold_and_only_the_noise_gets_gradients(sd1_pipe) -> None:
    free = sail(sd1_pipe, PROMPT, generations=2, threshold=-math.inf, iters=3)
    assert free.iters == 3 and not free.reached
    assert all(f < i for f, i in zip(free.losses, free.initial_losses, strict=True))
    assert not torch.equal(free.noise, initial_noise(sd1_pipe, 2, 0))
    assert all(p.grad is None for p in sd1_pipe.unet.parameters())
    target = max(free.initial_losses) - 1e-3  # reached by both generations after a step or two
    res = sail(sd1_pipe, PROMPT, generations=2, threshold=target, iters=10)
    assert res.reached and all(v <= target for v in res.losses) and 1 <= res.iters <= 10
    with pytest.raises(InputError):
        sail(sd1_pipe, PROMPT, threshold=math.nan)


def test_sail_images_are_plain_when_no_noise_moves_and_differ_when_they_do(sd1_pipe) -> None:
    plain = generate(sd1_pipe, [PROMPT], "none", generations=2, num_inference_steps=3)
    kept = generate(sd1_pipe, [PROMPT], "sail", generations=2, num_inference_steps=3,
                    method_options={"sail_threshold": 1e9})
    assert np.array_equal(kept.images[0], plain.images[0])
    moved = generate(sd1_pipe, [PROMPT], "sail", generations=2, num_inference_steps=3, iters=2,
                     method_options={"sail_threshold": 0.0})
    d = moved.decisions[0]
    assert not np.array_equal(moved.images[0], plain.images[0])
    assert (d.iters, d.reached) == (2, False) and d.details is not None
    assert d.final_loss == pytest.approx(np.mean(d.details["sail_losses"]))


def test_guarded_sail_only_touches_flagged_prompts(sd1_pipe) -> None:
    other = "a blue ball"
    scores = [d.score for d in generate(sd1_pipe, [PROMPT, other], "none", num_inference_steps=3).decisions]
    threshold = sum(scores) / 2
    out = generate(sd1_pipe, [PROMPT, other], "sail", threshold=threshold, num_inference_steps=3, iters=1,
                   method_options={"sail_threshold": 0.0})
    plain = generate(sd1_pipe, [PROMPT, other], "none", num_inference_steps=3)
    lo = int(np.argmin(scores))
    assert np.array_equal(out.images[lo], plain.images[lo]) and not out.decisions[lo].mitigated
    assert out.decisions[1 - lo].mitigated


def test_mitigate_cli_sail(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    args = ["mitigate", "--model", sd1_dir, "--prompts", prompts, "--method", "sail", "--num-inference-steps", 2,
            "--iters", 1, "--sail-threshold", 0]
    result = cli(*args, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    (row,) = read_results(tmp_path / "run" / "results.jsonl")
    assert row["method"] == "sail" and row["method_options"] == {"sail_threshold": 0.0} and row["iters"] == 1
    bad = cli(*args, "--c1", 2, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "c1 do not apply" in bad.stderr and "Traceback" not in bad.output
