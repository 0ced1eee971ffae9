"""Monitor: the d_t it records during ordinary pipeline calls equal the detector's, and it changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.monitor import Monitor
from diffmem.errors import InputError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' Euler and DPM-Solver hand numpy a tensor without the `copy` keyword numpy 2 expects
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
REL = 1e-4


def generate(pipe, reference, prompts: list[str], n: int = 1, steps: int = 4, **kwargs):
    """`pipe(...)` from the documented initial noise: generation g of every prompt starts from seed g."""
    latents = torch.cat([reference.noise(g) for g in range(n)]).repeat(len(prompts), 1, 1, 1)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompts, num_images_per_prompt=n, latents=latents, num_inference_steps=steps, **kwargs).images


def with_scheduler(pipe, scheduler_class) -> StableDiffusionPipeline:
    """The same components with another scheduler built from the pipeline's scheduler config."""
    components = {**pipe.components, "scheduler": scheduler_class.from_config(pipe.scheduler.config)}
    other = StableDiffusionPipeline(**components, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


@pytest.mark.parametrize("steps", ["first", "all"])
def test_monitor_scores_equal_detector_scores(pipe, reference, steps: str) -> None:
    with Monitor(pipe) as monitor:
        generate(pipe, reference, PROMPTS, n=2, steps=4)
    detector = MagnitudeDetector(pipe, steps=steps, generations=2, num_inference_steps=4)
    expected = detector.score(PROMPTS)
    mags = monitor.magnitudes()
    assert mags.shape == (4, 4)  # rows prompt-major (p0g0, p0g1, p1g0, p1g1), one column per sampling step
    k = 1 if steps == "first" else 4
    for p, res in enumerate(expected):
        assert mags[2 * p : 2 * p + 2, :k].tolist() == [pytest.approx(m, rel=REL) for m in res.magnitudes]
    assert monitor.scores(2, steps).tolist() == pytest.approx([r.score for r in expected], rel=REL)
    assert monitor.timesteps()[:k] == expected[0].timesteps


def test_images_are_bit_identical_with_and_without_the_monitor(pipe, reference) -> None:
    before = generate(pipe, reference, PROMPTS[:1], steps=3, output_type="np")
    with Monitor(pipe) as monitor:
        assert len(pipe.unet._forward_hooks) == 1
        during = generate(pipe, reference, PROMPTS[:1], steps=3, output_type="np")
    assert not pipe.unet._forward_hooks and not monitor.attached
    after = generate(pipe, reference, PROMPTS[:1], steps=3, output_type="np")
    assert np.array_equal(before, during) and np.array_equal(before, after)
    assert monitor.magnitudes().shape == (1, 3)  # still readable after detaching


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_other_schedulers(pipe, reference, scheduler_class) -> None:
    other = with_scheduler(pipe, scheduler_class)
    with Monitor(other) as monitor:
        generate(other, reference, PROMPTS[:1], steps=5)
    recorded = monitor.magnitudes()[0].tolist()
    # By hand on the scheduler's scaled model input (Euler divides x by sqrt(sigma^2 + 1)), v converted with
    # the scheduler's own noise level: the first step, and the whole trajectory.
    hand = reference.magnitudes(other, PROMPTS[0], reference.noise(0), 5, num_inference_steps=5)
    assert recorded == pytest.approx(hand, rel=REL)
    detected = MagnitudeDetector(other, steps="all", num_inference_steps=5).score(PROMPTS[:1])[0]
    assert detected.magnitudes[0] == pytest.approx(hand, rel=REL)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one prompt", "two prompts"])
def test_no_guidance_is_a_clear_error(sd1_pipe, reference, prompts: list[str]) -> None:
    with Monitor(sd1_pipe) as monitor:
        generate(sd1_pipe, reference, prompts, steps=2, guidance_scale=1.0)
    with pytest.raises(InputError, match="guidance"):
        monitor.magnitudes()


def test_scores_reject_a_wrong_images_per_prompt(sd1_pipe, reference) -> None:
    with Monitor(sd1_pipe) as monitor:
        generate(sd1_pipe, reference, PROMPTS, n=2, steps=1)
    assert monitor.images_per_prompt == 2 and "encode_prompt" not in vars(sd1_pipe)  # noted, then unwrapped
    for wrong, words in ((3, "does not match .* made 2 image"), (4, "does not match"), (1, "does not match"),
                         (0, "positive integer"), (True, "positive integer")):
        with pytest.raises(InputError, match=words) as info:
            monitor.scores(num_images_per_prompt=wrong)
        assert "\n" not in str(info.value)
    assert monitor.scores().tolist() == monitor.scores(num_images_per_prompt=2).tolist()  # the call's by default
    assert monitor.scores().shape == (2,)
    monitor.images_per_prompt = None  # not seen (the UNet called outside a pipeline): the rows must divide
    with pytest.raises(InputError, match="not a multiple"):
        monitor.scores(num_images_per_prompt=3)


def test_stop_after_detaches_and_on_record_can_stop_the_call(pipe, reference) -> None:
    seen: list[torch.Tensor] = []
    with Monitor(pipe, stop_after=1, on_record=seen.append) as monitor:
        generate(pipe, reference, PROMPTS, n=2, steps=4)
        assert not monitor.attached  # removed itself after the first guided step
    assert monitor.magnitudes().shape == (4, 1) and len(seen) == 1
    assert seen[0].tolist() == pytest.approx(monitor.magnitudes()[:, 0].tolist(), rel=1e-12)

    class Stop(Exception):
        pass

    def stop(_: torch.Tensor) -> None:
        raise Stop

    with pytest.raises(Stop), Monitor(pipe, on_record=stop) as monitor:
        generate(pipe, reference, PROMPTS[:1], steps=4)
    assert monitor.magnitudes().shape == (1, 1) and not pipe.unet._forward_hooks
