"""The page's Service on the flow/DiT models: screen, leave-one-out explain and the plain + embedding-mitigated
generation on tiny SD3, PixArt, Flux and DeepFloyd IF pipelines (the builders of test_flow_models and
test_deepfloyd), no browser. Flux guides by
true CFG at a scale above its default of 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.app.service import Service, Settings, Threshold
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.mitigate.embedding import mitigate_embedding
from diffmem.models.denoiser import Denoiser, initial_noise
from diffmem.models.loading import load_pipeline
from test_deepfloyd import tiny_if
from test_flow_models import FLUX_SAMPLE_SIZE, FLUX_TRUE_CFG, PROMPTS, STEPS, tiny_flux, tiny_pixart, tiny_sd3

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


@pytest.fixture(scope="module", params=["sd3", "pixart", "flux", "deepfloyd"])
def flow_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """A Service on a tiny pipeline saved and loaded as `diffmem serve --model <folder>` loads it."""
    from diffmem.models.loading import quiet_diffusers

    quiet_diffusers()
    folder = tmp_path_factory.mktemp("flow-app") / request.param
    builders = {"sd3": tiny_sd3, "pixart": tiny_pixart, "flux": tiny_flux, "deepfloyd": tiny_if}
    builders[request.param]().save_pretrained(folder)
    settings = Settings(num_inference_steps=STEPS, generate_steps=STEPS, mitigate_iters=2, target_loss=0.0,
                        guidance_scale=FLUX_TRUE_CFG if request.param == "flux" else None)
    pipe = load_pipeline(folder, device="cpu")
    if request.param == "flux":
        pipe.default_sample_size = FLUX_SAMPLE_SIZE
    return Service(pipe, str(folder), Threshold(0.0, "a test"), settings)


def test_screen_scores_as_the_detector(flow_service: Service) -> None:
    rows = flow_service.screen(PROMPTS)
    expected = MagnitudeDetector(flow_service.pipe, num_inference_steps=STEPS).score(PROMPTS)
    assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], rel=1e-5)
    assert all(r["flagged"] and r["error"] is None for r in rows)


def test_explain_leaves_one_word_out(flow_service: Service) -> None:
    out = flow_service.explain_prompt(PROMPTS[0], suggest=False)
    assert out["method"] == "leave-one-out" and [w["text"] for w in out["words"]] == PROMPTS[0].split()
    assert any(w["significance"] != 0 for w in out["words"])
    assert out["score"] == pytest.approx(flow_service.screen(PROMPTS[:1])[0]["score"], rel=1e-5)


def test_generate_pair_samples_plain_and_mitigated(flow_service: Service) -> None:
    pipe, s = flow_service.pipe, flow_service.settings
    out = flow_service.generate_pair(PROMPTS[0])
    assert out["error"] is None and out["plain"].shape == out["mitigated"].shape == (16, 16, 3)
    denoiser = Denoiser(pipe)
    noise = initial_noise(pipe, 1, s.seed)
    with torch.no_grad(), denoiser.starting_from(noise, [s.seed]) as start:  # the family's plain call, same noise
        plain = pipe(PROMPTS[0], **start, num_inference_steps=STEPS, output_type="np",
                     **denoiser.guidance(s.guidance_scale, embeddings=False), **denoiser.call_options(False)).images[0]
    np.testing.assert_array_equal(out["plain"], plain)
    assert not np.array_equal(out["plain"], out["mitigated"])
    res = mitigate_embedding(pipe, PROMPTS[0], generations=s.generations, seed=s.seed, target_loss=0.0, iters=2,
                             guidance_scale=s.guidance_scale, num_inference_steps=STEPS)
    m = out["mitigation"]
    assert (m["iters"], m["reached"]) == (2, False) and m["final_loss"] == pytest.approx(res.final_loss, rel=1e-5)
    assert m["score"] == pytest.approx(res.final_loss, rel=1e-4)  # the mitigated conditioning's first-step score
