"""Shared fixtures: tiny SD pipelines saved and loaded back as a user would, a CLI runner, a reference."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings  # noqa: E402

# Fuzzing budgets (tests/test_io_fuzz.py): `make test` runs a fixed few seconds' worth; `make fuzz` selects the
# long profile (HYPOTHESIS_PROFILE=fuzz), which also reports what it found in its statistics.
settings.register_profile("default", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

KINDS = ("sd1", "sd2-v")


def save_tiny(tmp_path_factory: pytest.TempPathFactory, build: Callable[[], object], where: str, name: str) -> Path:
    """`build()`'s pipeline saved as a diffusers folder `where/name`, as a user's model is (diffusers quiet)."""
    from diffmem.models.loading import quiet_diffusers

    quiet_diffusers()
    folder = tmp_path_factory.mktemp(where) / name
    build().save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread: the tiny models gain nothing from more, and on a small shared CPU
    spinning threads make a 10 ms UNet call take over a second while another process is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`tiny_pipeline(kind)` saved as diffusers folders, one per kind (epsilon and v-prediction)."""
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.tiny import tiny_pipeline

    quiet_diffusers()
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = root / kind
        tiny_pipeline(kind).save_pretrained(dirs[kind])
    return dirs


def _loaded(model_dirs: dict[str, Path], kind: str):
    """Load a saved tiny pipeline with `load_pipeline` and run it once (the first call warms kernels up)."""
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.models.loading import load_pipeline

    pipe = load_pipeline(model_dirs[kind], device="cpu")
    MagnitudeDetector(pipe).score(["warm-up"])
    return pipe


@pytest.fixture(scope="session")
def sd1_pipe(model_dirs: dict[str, Path]):
    """The epsilon-prediction tiny pipeline, loaded from its folder."""
    return _loaded(model_dirs, "sd1")


@pytest.fixture(scope="session")
def sd2v_pipe(model_dirs: dict[str, Path]):
    """The v-prediction tiny pipeline, loaded from its folder."""
    return _loaded(model_dirs, "sd2-v")


@pytest.fixture(params=KINDS)
def pipe(request: pytest.FixtureRequest):
    """Each tiny pipeline in turn (tests using it run for both prediction types)."""
    return request.getfixturevalue({"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe"}[request.param])


@pytest.fixture(scope="session")
def sd1_dir(model_dirs: dict[str, Path]) -> Path:
    """Folder of the epsilon-prediction tiny pipeline, for `--model`."""
    return model_dirs["sd1"]


@pytest.fixture
def cli() -> Callable:
    """Run `diffmem ARGS...` in-process; returns click's Result (`exit_code`, `stdout`, `stderr`)."""
    from typer.testing import CliRunner

    from diffmem.cli import app

    runner = CliRunner()

    def run(*args: object):
        return runner.invoke(app, [str(a) for a in args])

    return run


def _alpha_sigma(scheduler, t: torch.Tensor, step: int) -> tuple[float, float]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) at a step, read off the scheduler's own noise tables."""
    if float(scheduler.init_noise_sigma) > 1:  # k-diffusion style (Euler): sigma_k = sigma_t / alpha_t
        sigma = float(scheduler.sigmas[step])
        alpha = (1 + sigma**2) ** -0.5
        return alpha, sigma * alpha
    abar = float(scheduler.alphas_cumprod[int(t)])
    return abar**0.5, (1 - abar) ** 0.5


class Reference:
    """METHOD.md section 1 by hand, independent of diffmem's batching, text encoding and epsilon.py."""

    @staticmethod
    def noise(seed: int) -> torch.Tensor:
        """The initial latent of seed `seed` (1x4x8x8): `torch.randn` from a CPU generator seeded so."""
        return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))

    @staticmethod
    @torch.no_grad()
    def magnitudes(
        pipe,
        prompt: str,
        latents: torch.Tensor,
        n_steps: int,
        num_inference_steps: int = 50,
        guidance: float = 7.5,
    ) -> list[float]:
        """`d_t` of one prompt and initial latent over the first `n_steps` of a plain CFG sampling loop.

        Two unbatched UNet calls per step, the embeddings from diffusers' own `encode_prompt`, a fresh copy of
        the pipeline's scheduler, and v-prediction converted to epsilon as `alpha_t * v + sigma_t * x_t`.
        """
        cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        x = latents * scheduler.init_noise_sigma
        out = []
        for step, t in enumerate(scheduler.timesteps[:n_steps]):
            x_in = scheduler.scale_model_input(x, t)
            pred_c = pipe.unet(x_in, t, encoder_hidden_states=cond).sample
            pred_u = pipe.unet(x_in, t, encoder_hidden_states=uncond).sample
            eps_c, eps_u = pred_c, pred_u
            if scheduler.config.prediction_type == "v_prediction":
                alpha, sigma = _alpha_sigma(scheduler, t, step)
                eps_c, eps_u = alpha * pred_c + sigma * x_in, alpha * pred_u + sigma * x_in
            out.append(float((eps_c - eps_u).flatten().norm()))
            x = scheduler.step(pred_u + guidance * (pred_c - pred_u), t, x).prev_sample
        return out

    @staticmethod
    @torch.no_grad()
    def anisotropy(pipe, prompt: str, latent: torch.Tensor, step: int = -3) -> tuple[float, float]:
        """Asthana & Belagiannis's two terms for one prompt and pure-noise latent (METHOD.md section 6):
        `d_T` at the first timestep, and at `timesteps[step]` of a 50-step schedule the mean over pixels of the
        channel cosine between eps_u and eps_c - eps_u, both on `latent` itself (DDIM: no input scaling)."""
        cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(50)
        terms = []
        for index in (0, step):
            t = scheduler.timesteps[index]
            eps_c = pipe.unet(latent, t, encoder_hidden_states=cond).sample
            eps_u = pipe.unet(latent, t, encoder_hidden_states=uncond).sample
            if scheduler.config.prediction_type == "v_prediction":
                alpha, sigma = _alpha_sigma(scheduler, t, index)
                eps_c, eps_u = alpha * eps_c + sigma * latent, alpha * eps_u + sigma * latent
            diff = eps_c - eps_u
            if index == 0:
                terms.append(float(diff.flatten().norm()))
            else:
                cos = (eps_u * diff).sum(dim=1) / (eps_u.norm(dim=1) * diff.norm(dim=1))
                terms.append(float(cos.mean()))
        return terms[0], terms[1]

    @staticmethod
    @torch.no_grad()
    def sharpness(pipe, prompt: str, latent: torch.Tensor) -> float:
        """Jeon et al.'s `||H_delta s_delta||^2` at the first DDIM step by a central finite difference in float64,
        independent of forward-mode autodiff: `(s_delta(x + h v) - s_delta(x - h v)) / 2h` along `v = s_delta(x)`."""
        import copy

        cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
        cond, uncond = cond.double(), uncond.double()
        unet = copy.deepcopy(pipe.unet).double()
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(50)
        t = scheduler.timesteps[0]
        alpha, sigma = _alpha_sigma(scheduler, t, 0)

        def s_delta(x: torch.Tensor) -> torch.Tensor:
            eps_c = unet(x, t, encoder_hidden_states=cond).sample
            eps_u = unet(x, t, encoder_hidden_states=uncond).sample
            if scheduler.config.prediction_type == "v_prediction":
                eps_c, eps_u = alpha * eps_c + sigma * x, alpha * eps_u + sigma * x
            return -(eps_c - eps_u) / sigma

        x = latent.double()
        v = s_delta(x)
        h = 1e-4 / float(v.norm())
        return float(((s_delta(x + h * v) - s_delta(x - h * v)) / (2 * h)).pow(2).sum())


@pytest.fixture(scope="session")
def reference() -> type[Reference]:
    """The hand-written reference computation (noise and `d_t`), for tests to compare diffmem against."""
    return Reference


@pytest.fixture(scope="session")
def testbed_service():
    """`diffmem serve`'s service on the testbed, threshold calibrated at startup on the held-out prompts."""
    from diffmem.app.server import build_service

    return build_service("testbed", device="cpu")


@pytest.fixture(scope="session")
def app_server(testbed_service):
    """The whole app (page and API) on the testbed, served by uvicorn on a free 127.0.0.1 port; yields its URL."""
    from diffmem.app.server import BackgroundServer, create_app

    with BackgroundServer(create_app(testbed_service)) as server:
        yield server.url


@pytest.fixture(scope="session")
def memorized_prompt(testbed_service) -> str:
    """The memorized (planted) testbed caption that scores highest at the first step. The testbed's first-step
    detection flags only some memorized prompts at 1% FPR (README), so the app tests pick one it flags."""
    from diffmem.testbed.recipe import shipped_recipe

    planted = [item.caption for item in shipped_recipe().splits().planted]
    size = testbed_service.limits.max_batch
    rows = [row for i in range(0, len(planted), size) for row in testbed_service.screen(planted[i : i + size])]
    return max(zip(rows, planted, strict=True), key=lambda pair: pair[0]["score"])[1]
