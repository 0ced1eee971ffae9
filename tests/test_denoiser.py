"""`diffmem.models.denoiser`: parameterization conversions against diffusers' own noise tables, and the one
denoiser path (predict, CFG, the shared first-step CFG, the first-step input) on SD 1/2 and SDXL."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.mitigate.embedding import FirstStep
from diffmem.mitigate.sail import SailLoss
from diffmem.models.conditioning import empty, encode
from diffmem.models.denoiser import PREDICTION_TYPES, Denoiser, Parameterization, initial_noise

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' Euler hands numpy a tensor without the `copy` keyword numpy 2 expects
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
TABLES = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def xl():
    """A tiny random SDXL pipeline (pooled embeddings, time ids, Euler)."""
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.tiny import tiny_pipeline

    quiet_diffusers()
    return tiny_pipeline("sdxl")


@pytest.fixture(params=["sd1", "sd2-v", "sdxl"])
def any_pipe(request: pytest.FixtureRequest, xl):
    """Each tiny pipeline: SD epsilon, SD v-prediction, SDXL."""
    return xl if request.param == "sdxl" else request.getfixturevalue(
        {"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe"}[request.param])


def _noisy(t: torch.Tensor, generator_seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A clean sample, its noise and `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` by diffusers' `add_noise`."""
    gen = torch.Generator().manual_seed(generator_seed)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    return x0, eps, DDIMScheduler(**TABLES).add_noise(x0, eps, t.long())


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [torch.tensor(981), torch.tensor([981, 500, 21])])
def test_each_parameterization_round_trips_through_epsilon_and_x0(kind: str, t: torch.Tensor) -> None:
    param = Parameterization.of(DDIMScheduler(**TABLES, prediction_type=kind))
    x0, eps, x_t = _noisy(t)
    out = param.from_epsilon(eps, x_t, t)
    # what diffusers trains each kind to predict: the noise, the velocity, the clean sample
    target = {"epsilon": eps, "v_prediction": DDIMScheduler(**TABLES).get_velocity(x0, eps, t), "sample": x0}[kind]
    assert torch.allclose(out, target, atol=1e-4)
    assert torch.allclose(param.to_epsilon(out, x_t, t), eps, atol=1e-4)
    assert torch.allclose(param.to_x0(out, x_t, t), x0, atol=1e-3)


def test_conversions_chain_between_parameterizations() -> None:
    # v -> eps -> sample prediction equals v -> x0 directly; and back to v.
    t = torch.tensor([900, 300, 40])
    x0, eps, x_t = _noisy(t, 1)
    v_param, s_param = (Parameterization.of(DDIMScheduler(**TABLES, prediction_type=k))
                        for k in ("v_prediction", "sample"))
    v = v_param.from_epsilon(eps, x_t, t)
    as_sample = s_param.from_epsilon(v_param.to_epsilon(v, x_t, t), x_t, t)
    assert torch.allclose(as_sample, v_param.to_x0(v, x_t, t), atol=1e-4)
    assert torch.allclose(v_param.from_epsilon(s_param.to_epsilon(as_sample, x_t, t), x_t, t), v, atol=1e-3)


def test_k_diffusion_inputs_convert_with_the_same_tables() -> None:
    # Euler's latents are x0 + sigma_k eps; its scaled input is the variance-preserving x_t the tables describe.
    scheduler = EulerDiscreteScheduler(**TABLES, prediction_type="v_prediction", timestep_spacing="leading",
                                       steps_offset=1)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    x0, eps, _ = _noisy(t, 2)
    x_in = scheduler.scale_model_input(x0 + scheduler.sigmas[3] * eps, t)
    param = Parameterization.of(scheduler)
    v = param.from_epsilon(eps, x_in, t)
    assert torch.allclose(param.to_x0(v, x_in, t), x0, atol=1e-3)
    assert torch.allclose(param.to_epsilon(v, x_in, t), eps, atol=1e-4)


def test_epsilon_is_float32_and_unknown_kinds_are_refused() -> None:
    param = Parameterization.of(DDIMScheduler(**TABLES))
    half = torch.ones(1, 4, 2, 2, dtype=torch.float16)
    assert param.kind == "epsilon" and param.to_epsilon(half, half, 10).dtype == torch.float32
    with pytest.raises(ValueError, match="flow"):
        Parameterization("flow", DDIMScheduler(**TABLES))


def test_cfg_is_two_predict_calls(any_pipe) -> None:
    den = Denoiser(any_pipe)
    scheduler = den.schedule(5)
    t = scheduler.timesteps[1]
    x = den.first_input(initial_noise(any_pipe, 2, 7), scheduler, t)
    with torch.no_grad():
        cond, uncond = encode(any_pipe, PROMPTS), den.empty().expand(2)
        pred_c, pred_u = den.cfg(x, t, cond, uncond)
        param = Parameterization.of(scheduler)
        eps_c, eps_u = den.cfg_epsilon(x, t, cond, uncond, param)
        alone_c, alone_u = den.predict(x, t, cond), den.predict(x, t, uncond)
    assert torch.allclose(pred_c, alone_c, atol=1e-5) and torch.allclose(pred_u, alone_u, atol=1e-5)
    assert not torch.allclose(pred_c, pred_u, atol=1e-3)  # the conditioning reaches the denoiser
    assert torch.equal(eps_c, param.to_epsilon(pred_c, x, t)) and torch.equal(eps_u, param.to_epsilon(pred_u, x, t))


def test_shared_cfg_equals_the_plain_cfg_and_runs_the_empty_prompt_once(any_pipe) -> None:
    den = Denoiser(any_pipe)
    scheduler = den.schedule(5)
    t = scheduler.timesteps[0]
    x = den.first_input(initial_noise(any_pipe, 2, 3), scheduler)
    rows: list[int] = []
    handle = den.model.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            cond = encode(any_pipe, PROMPTS)
            pred_c, pred_u, inputs = den.cfg_shared(x, t, cond)
            again = den.cfg_shared(x, t, encode(any_pipe, PROMPTS[:1]))
    finally:
        handle.remove()
    assert rows == [4, 2, 2]  # 2 prompts x 2 generations, the empty prompt on 2 noises once, then 1 x 2 only
    with torch.no_grad():
        plain_c, plain_u = den.cfg(x.repeat(2, 1, 1, 1), t, cond.repeat_interleave(2), den.empty().expand(4))
    assert torch.equal(inputs, x.repeat(2, 1, 1, 1))  # prompt-major rows: prompt i, generation g at i * 2 + g
    assert torch.allclose(pred_c, plain_c, atol=1e-5) and torch.allclose(pred_u, plain_u, atol=1e-5)
    assert torch.equal(again[1], pred_u[:2]) and torch.allclose(again[0], pred_c[:2], atol=1e-5)


def test_first_input_is_where_the_pipeline_starts(any_pipe) -> None:
    den = Denoiser(any_pipe)
    scheduler = den.schedule(5)
    noise = initial_noise(any_pipe, 2, 0)
    x = den.first_input(noise, scheduler)
    sigma = float(scheduler.init_noise_sigma)
    if sigma > 1:  # Euler: latents sigma_max * noise, scaled by 1 / sqrt(sigma_0^2 + 1) for the denoiser
        assert torch.allclose(x, noise * sigma / (float(scheduler.sigmas[0]) ** 2 + 1) ** 0.5)
    else:  # DDIM: the noise itself
        assert torch.equal(x, noise)
    seen: list[torch.Tensor] = []
    handle = den.model.register_forward_hook(lambda _m, args, _out: seen.append(args[0][:1].clone()))
    try:
        any_pipe(PROMPTS[0], latents=noise[:1], num_inference_steps=5, output_type="latent")
    finally:
        handle.remove()
    assert torch.equal(seen[0], x[:1])


def test_detection_and_mitigation_start_from_the_same_first_step(any_pipe) -> None:
    # The embedding mitigation's loss of the prompt's own embedding is its first-step detection score, and SAIL's
    # guidance on the same noise is the same eps_c - eps_u.
    score = MagnitudeDetector(any_pipe, generations=2, seed=4, num_inference_steps=5).score(PROMPTS[:1])[0]
    with torch.no_grad():
        cond = encode(any_pipe, PROMPTS[:1])
        loss = FirstStep(any_pipe, 2, 4, 5).loss(cond)
        guidance = SailLoss(any_pipe, cond, empty(any_pipe), num_inference_steps=5).guidance(initial_noise(any_pipe,
                                                                                                           2, 4))
    assert float(loss) == pytest.approx(score.score, rel=1e-5)
    assert guidance.flatten(1).norm(dim=1).tolist() == pytest.approx([m[0] for m in score.magnitudes], rel=1e-4)
