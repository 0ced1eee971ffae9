"""MagnitudeDetector against a hand-written CFG loop, for epsilon and v-prediction models (METHOD.md 1)."""

from __future__ import annotations

import pytest
import torch

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "a blue ball", "portrait of a smiling old man, oil painting"]
REL = 1e-4  # batched vs unbatched float32 UNet calls differ in the last bits


def test_first_step_score_is_the_norm_of_eps_c_minus_eps_u(pipe, reference) -> None:
    results = MagnitudeDetector(pipe, generations=2, seed=3).score(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        hand = [reference.magnitudes(pipe, prompt, reference.noise(3 + g), n_steps=1)[0] for g in range(2)]
        assert res.prompt == prompt and res.error is None
        assert [m[0] for m in res.magnitudes] == pytest.approx(hand, rel=REL)
        assert res.score == pytest.approx(sum(hand) / 2, rel=REL)
        assert res.timesteps == [981.0]  # SD's DDIM schedule: 50 "leading" steps with offset 1 start at 981


def test_v_prediction_is_scored_in_epsilon_space(sd2v_pipe, reference) -> None:
    # The raw v-space difference is a different number: scoring it would fail the test above for sd2-v.
    pipe = sd2v_pipe
    latent = reference.noise(0)
    cond, uncond = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    t = torch.tensor(981)
    with torch.no_grad():
        raw = (pipe.unet(latent, t, cond).sample - pipe.unet(latent, t, uncond).sample).norm()
    score = MagnitudeDetector(pipe).score(PROMPTS[:1])[0].score
    assert score == pytest.approx(reference.magnitudes(pipe, PROMPTS[0], latent, 1)[0], rel=REL)
    assert abs(score - float(raw)) > 0.05 * score


@pytest.mark.parametrize("steps", ["all", 3])
def test_multi_step_scores_follow_the_guided_trajectory(pipe, reference, steps: str | int) -> None:
    detector = MagnitudeDetector(pipe, steps=steps, num_inference_steps=5, guidance_scale=5.0, generations=2)
    n_steps = 5 if steps == "all" else steps
    for prompt, res in zip(PROMPTS[:2], detector.score(PROMPTS[:2]), strict=True):
        hand = [reference.magnitudes(pipe, prompt, reference.noise(g), n_steps, 5, 5.0) for g in range(2)]
        assert res.magnitudes == [pytest.approx(h, rel=REL) for h in hand]
        assert res.score == pytest.approx(sum(map(sum, hand)) / (2 * n_steps), rel=REL)
        assert len(res.timesteps) == n_steps and res.timesteps == sorted(res.timesteps, reverse=True)


def test_first_step_runs_the_empty_prompt_once_per_detector(sd1_pipe, reference) -> None:
    # Every prompt starts from the same noise, so eps(x_T, "") is shared: one UNet call over the n generations,
    # then each batch runs its conditional rows only (a full CFG batch would be 2x the rows).
    rows: list[int] = []
    handle = sd1_pipe.unet.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        detector = MagnitudeDetector(sd1_pipe, generations=2, batch_size=4)
        first = detector.score(PROMPTS)  # batches of 2 prompts x 2 generations, then 1 x 2
        again = detector.score(PROMPTS[:1])
    finally:
        handle.remove()
    assert rows == [4, 2, 2, 2]
    hand = [reference.magnitudes(sd1_pipe, PROMPTS[0], reference.noise(g), n_steps=1)[0] for g in range(2)]
    for res in (first[0], again[0]):  # the cached prediction serves later calls too
        assert res.magnitudes == [[pytest.approx(h, rel=REL)] for h in hand]


def test_score_does_not_depend_on_batch_size_or_neighbours(sd1_pipe) -> None:
    prompts = [f"a photo of object number {i} in a garden" for i in range(7)]

    def scores(batch: list[str], batch_size: int) -> dict[str, list[list[float]]]:
        found = MagnitudeDetector(sd1_pipe, generations=2, batch_size=batch_size).score(batch)
        return {r.prompt: r.magnitudes for r in found}

    alone = {p: scores([p], 1)[p] for p in prompts}
    for batch, batch_size in ((prompts, 1), (prompts, 3), (prompts, 32), (prompts[::-1], 5)):
        got = scores(batch, batch_size)
        for p in prompts:
            assert got[p] == [pytest.approx(g, rel=1e-5) for g in alone[p]]


def test_seed_sets_the_noise_of_each_generation(sd1_pipe) -> None:
    two = MagnitudeDetector(sd1_pipe, generations=2, seed=0).score(PROMPTS)
    again = MagnitudeDetector(sd1_pipe, generations=2, seed=0).score(PROMPTS)
    seed0 = MagnitudeDetector(sd1_pipe, seed=0).score(PROMPTS)
    seed1 = MagnitudeDetector(sd1_pipe, seed=1).score(PROMPTS)
    for a, b, s0, s1 in zip(two, again, seed0, seed1, strict=True):
        expected = [s0.magnitudes[0], s1.magnitudes[0]]  # generation g uses seed + g
        assert a.magnitudes == [pytest.approx(m, rel=1e-5) for m in expected]
        assert s0.score != pytest.approx(s1.score, rel=1e-3)  # another seed, another noise, another score
        assert a.score == b.score and (s0.seed, s1.seed) == (0, 1)


def test_truncated_prompt_is_flagged_with_the_cut_text(sd1_pipe) -> None:
    kept = " ".join(["cat"] * 75)  # 75 tokens: exactly what fits between BOS and EOS
    long = kept + " dog bird fish"
    fits, cut, short = MagnitudeDetector(sd1_pipe).score([kept, long, "a cat"])
    assert (fits.truncated, fits.n_tokens, fits.truncated_text) == (False, 75, "")
    assert (cut.truncated, cut.n_tokens, cut.truncated_text.strip()) == (True, 78, "dog bird fish")
    assert not short.truncated and short.n_tokens == 2
    assert cut.score == pytest.approx(fits.score, rel=1e-6)  # what is scored is the kept part


def test_non_finite_denoiser_output_gives_null_score_for_that_prompt_only(
    pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = MagnitudeDetector(pipe).score(PROMPTS)
    poison, _ = pipe.encode_prompt(PROMPTS[1], "cpu", 1, False)
    forward = pipe.unet.forward

    def nan_for_poison(sample, timestep, encoder_hidden_states, **kwargs):
        out = forward(sample, timestep, encoder_hidden_states, **kwargs)
        rows = (encoder_hidden_states - poison).abs().flatten(1).amax(dim=1) < 1e-4
        (out[0] if isinstance(out, tuple) else out.sample)[rows] = float("nan")
        return out

    monkeypatch.setattr(pipe.unet, "forward", nan_for_poison)
    results = MagnitudeDetector(pipe).score(PROMPTS)
    assert results[1].score is None and results[1].magnitudes == [[None]]
    assert results[1].error and "non-finite" in results[1].error
    for i in (0, 2):
        assert results[i].error is None
        assert results[i].score == pytest.approx(clean[i].score, rel=1e-5)


@pytest.mark.parametrize(
    "settings",
    [{"steps": "bad"}, {"steps": 0}, {"steps": 51}, {"generations": 0}, {"batch_size": 0},
     {"guidance_scale": float("nan")}],
)
def test_bad_settings_are_input_errors(sd1_pipe, settings: dict) -> None:
    with pytest.raises(InputError):
        MagnitudeDetector(sd1_pipe, **settings)


def test_anisotropy_score_is_norm_plus_weighted_low_noise_cosine(pipe, reference) -> None:
    results = AnisotropyDetector(pipe, generations=2, seed=5, cosine_weight=1.5).score(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        hand = [reference.anisotropy(pipe, prompt, reference.noise(5 + g)) for g in range(2)]
        assert res.magnitudes == [[pytest.approx(d, rel=REL)] for d, _ in hand]
        assert res.terms == [pytest.approx(c, rel=1e-3, abs=1e-5) for _, c in hand]
        norm, cos = sum(d for d, _ in hand) / 2, sum(c for _, c in hand) / 2
        assert res.score == pytest.approx(norm + 1.5 * cos, rel=1e-4)
        assert res.timesteps == [981.0]  # where `magnitudes` is read; the cosine is at 41 (hook test below)


def test_anisotropy_without_its_cosine_term_is_wen_first_step(sd1_pipe) -> None:
    wen = MagnitudeDetector(sd1_pipe, generations=2).score(PROMPTS)
    plain = AnisotropyDetector(sd1_pipe, generations=2, cosine_weight=0.0).score(PROMPTS)
    weighted = AnisotropyDetector(sd1_pipe, generations=2, cosine_weight=3.0).score(PROMPTS)
    for w, p, q in zip(wen, plain, weighted, strict=True):
        assert p.score == pytest.approx(w.score, rel=1e-5)
        assert q.score - p.score == pytest.approx(3.0 * sum(q.terms) / 2, rel=1e-4, abs=1e-6)
    assert wen[0].terms is None


def test_anisotropy_runs_the_empty_prompt_once_per_timestep(sd1_pipe) -> None:
    rows: list[tuple[int, float]] = []
    hook = sd1_pipe.unet.register_forward_hook(lambda _m, args, _o: rows.append((args[0].shape[0], float(args[1]))))
    try:
        detector = AnisotropyDetector(sd1_pipe, generations=2, batch_size=4)
        detector.score(PROMPTS)  # 2 prompts x 2 generations, then 1 x 2
    finally:
        hook.remove()
    assert rows == [(4, 981), (2, 981), (4, 41), (2, 41), (2, 981), (2, 41)]  # 41: third from last of DDIM's 50


@pytest.mark.parametrize("settings", [{"cosine_weight": float("inf")}, {"cosine_step": 50}, {"generations": 0}])
def test_bad_anisotropy_settings_are_input_errors(sd1_pipe, settings: dict) -> None:
    with pytest.raises(InputError):
        AnisotropyDetector(sd1_pipe, **settings)


def test_sharpness_is_the_squared_hessian_vector_product_of_the_score_difference(pipe, reference) -> None:
    results = SharpnessDetector(pipe, generations=2, seed=2, batch_size=3).score(PROMPTS)
    wen = MagnitudeDetector(pipe, generations=2, seed=2).score(PROMPTS)
    for prompt, res, w in zip(PROMPTS, results, wen, strict=True):
        hand = [reference.sharpness(pipe, prompt, reference.noise(2 + g)) for g in range(2)]
        assert res.terms == [pytest.approx(h, rel=2e-3) for h in hand]
        assert res.score == pytest.approx(sum(hand) / 2, rel=2e-3)
        assert res.magnitudes == [pytest.approx(m, rel=REL) for m in w.magnitudes]  # d_T comes for free
        assert res.timesteps == [981.0]
