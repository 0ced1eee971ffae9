"""The 2025 mitigations that change guidance or the initial noise (Jain et al.'s delayed guidance, Han et al.'s
initial-noise adjustment, PRSS) against hand-written sampling loops on the tiny pipelines, their option checks,
and `diffmem mitigate` with each."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffmem.errors import InputError
from diffmem.io.results import read_results
from diffmem.mitigate import generate
from diffmem.mitigate.base import MITIGATIONS
from diffmem.mitigate.initial_noise import scaled_rho
from diffmem.mitigate.prss import read_paraphrases, search
from diffmem.models.defaults import ModelDefaults
from diffmem.testbed.scenes import Scene, paraphrases

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cube on a wooden table"
OTHER = "a blue ball on the grass"
STEPS = 6
SCALE = 7.5


def _eps(scheduler, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v-prediction to epsilon with the scheduler's own tables (DDIM: sqrt(abar), sqrt(1 - abar))."""
    if scheduler.config.prediction_type != "v_prediction":
        return pred
    abar = float(scheduler.alphas_cumprod[int(t)])
    return abar**0.5 * pred + (1 - abar) ** 0.5 * x


def _embeds(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    return cond, uncond


def _loop(pipe, latent: torch.Tensor, combine: Callable, prompts: tuple[str, ...] = (PROMPT,)) -> torch.Tensor:
    """A sampling loop with unbatched UNet calls: at step i, `combine(i, t, x, preds, eps)` gives the noise
    prediction from the raw predictions of "" and each prompt (`preds`) and their epsilon (`eps`)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    embeds = {p: _embeds(pipe, p)[0] for p in prompts} | {"": _embeds(pipe, PROMPT)[1]}
    x = latent.clone() * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            inp = scheduler.scale_model_input(x, t)
            preds = {p: pipe.unet(inp, t, encoder_hidden_states=e).sample for p, e in embeds.items()}
            eps = {p: _eps(scheduler, v, inp, t) for p, v in preds.items()}
            x = scheduler.step(combine(i, t, x, preds, eps), t, x).prev_sample
    return x


def _latents(pipe, method: str, generations: int = 2, seed: int = 3, **options) -> tuple[torch.Tensor, dict]:
    res = generate(pipe, [PROMPT], method, generations=generations, seed=seed, num_inference_steps=STEPS,
                   guidance_scale=SCALE, output_type="latent", method_options=options or None)
    return torch.as_tensor(res.images[0]), res.decisions[0].to_dict()


def _jain(early: float, boundary: float | None) -> tuple[Callable, list[int | None]]:
    """Jain et al.'s rule as their scripts write it, on one generation; the list gets the switch step."""
    state = {"prev": -1.0, "prev2": -1.0, "later": False}
    switched: list[int | None] = [None]

    def combine(i, t, x, preds, eps):
        d = float((eps[PROMPT] - eps[""]).norm())
        now = (d > state["prev"] and state["prev2"] > state["prev"]) if boundary is None else float(t) <= boundary
        if now and not state["later"]:
            state["later"], switched[0] = True, i
        state["prev2"], state["prev"] = state["prev"], d
        s = SCALE if state["later"] else early
        return preds[""] + s * (preds[PROMPT] - preds[""])

    return combine, switched


@pytest.mark.parametrize(("early", "boundary"), [(1.0, None), (-2.0, 500.0), (0.0, None)])
def test_delayed_guidance_is_the_authors_loop(pipe, reference, early: float, boundary: float | None) -> None:
    options = {"early_guidance": early} | ({} if boundary is None else {"transition_timestep": boundary})
    got, row = _latents(pipe, "delayed-guidance", **options)
    for g in range(2):
        combine, switched = _jain(early, boundary)
        hand = _loop(pipe, reference.noise(3 + g), combine)
        torch.testing.assert_close(got[g : g + 1], hand, rtol=1e-4, atol=1e-4)
        assert row["details"]["guidance_from_step"][g] == switched[0]
    if boundary is not None:
        assert row["details"]["guidance_from_step"][0] is not None  # the static rule switched


def test_delayed_guidance_after_the_transition_is_plain_guidance(sd1_pipe) -> None:
    plain, _ = _latents(sd1_pipe, "none")
    never, row = _latents(sd1_pipe, "delayed-guidance", transition_timestep=1000.0)  # full guidance from step 0
    assert torch.equal(plain, never) and row["details"]["guidance_from_step"] == [0, 0]
    assert row["final_loss"] == pytest.approx(_latents(sd1_pipe, "none")[1]["final_loss"])  # the plain score


def test_initial_noise_batch_is_the_authors_adjustment_then_unguided_steps(pipe, reference) -> None:
    rho, gamma, k = 2.0, 0.7, 1
    got, row = _latents(pipe, "initial-noise", rho=rho, gamma=gamma, adj_iters=2, apply_cfg_step=k)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t0 = scheduler.timesteps[0]
    cond, uncond = _embeds(pipe, PROMPT)

    def e(z: torch.Tensor) -> torch.Tensor:
        c = pipe.unet(z, t0, encoder_hidden_states=cond).sample
        u = pipe.unet(z, t0, encoder_hidden_states=uncond).sample
        return _eps(scheduler, c, z, t0) - _eps(scheduler, u, z, t0)

    for g in range(2):
        x = reference.noise(3 + g)
        with torch.no_grad():
            for _ in range(2):
                d = e(x)
                x = x - gamma * (e(x + rho * d / d.norm()) - d)
        hand = _loop(pipe, x, lambda i, t, z, p, _: p[""] if i <= k else p[""] + SCALE * (p[PROMPT] - p[""]))
        torch.testing.assert_close(got[g : g + 1], hand, rtol=1e-4, atol=1e-4)
    assert row["details"]["guidance_from_step"] == [k + 1, k + 1] and row["iters"] == 2


def test_initial_noise_radius_scales_with_the_latent() -> None:
    assert scaled_rho(None, torch.zeros(1, 4, 64, 64)) == 50.0  # the authors' SD v1.4 value
    assert scaled_rho(None, torch.zeros(2, 4, 8, 8)) == pytest.approx(50 / 8)
    assert scaled_rho(3.0, torch.zeros(1, 4, 8, 8)) == 3.0


def test_initial_noise_per_sample_stops_at_the_target(sd1_pipe) -> None:
    plain, plain_row = _latents(sd1_pipe, "none")
    kept, row = _latents(sd1_pipe, "initial-noise", variant="sample", target_loss=math.inf)
    assert torch.equal(plain, kept) and (row["iters"], row["reached"]) == (0, True)  # nothing to move
    moved, row = _latents(sd1_pipe, "initial-noise", variant="sample", target_loss=-math.inf, noise_iters=3)
    assert (row["iters"], row["reached"]) == (3, False) and not torch.equal(plain, moved)
    assert all(f < i for f, i in zip(row["details"]["noise_losses"], row["details"]["initial_losses"], strict=True))
    assert row["final_loss"] < plain_row["final_loss"]
    assert all(p.grad is None for p in sd1_pipe.unet.parameters())
    made = MITIGATIONS["initial-noise"](sd1_pipe)
    assert made.config.target_loss == ModelDefaults.of(sd1_pipe).target_loss  # the model's own


def test_prss_search_is_the_authors_order() -> None:
    mags = torch.tensor([[0.5, 2.0, 3.0], [0.1, 1.5, 2.5], [0.2, 0.9, 2.0]])  # candidates x generations
    found = search(mags, 1.0)
    assert found.chosen == [0, 2, 2] and found.reanchor == [False, True, True]
    assert found.magnitudes == pytest.approx([0.5, 0.9, 2.0])


def _paraphrase_file(tmp_path: Path, table: dict) -> str:
    path = tmp_path / "para.json"
    path.write_text(json.dumps(table))
    return str(path)


def test_prss_is_the_authors_re_anchoring(pipe, reference, tmp_path: Path) -> None:
    file = _paraphrase_file(tmp_path, {PROMPT: [OTHER]})
    low, full = 1e-6, 1e-3
    got, row = _latents(pipe, "prss", paraphrases=file, search_target=1e-9, anchor_target=low, anchor_full=full)
    details = row["details"]
    assert details["prss_reanchored"] == [True, True]
    for g in range(2):
        chosen = details["prss_prompts"][g]

        def combine(i, t, x, p, eps, chosen=chosen):
            mag = float((eps[chosen] - eps[""]).norm())
            base = (SCALE * low - full) / (SCALE - 1)
            s_pr = min((mag - base) / (full - base) * SCALE, SCALE)
            return p[PROMPT] + s_pr * (p[chosen] - p[PROMPT]) + (SCALE - s_pr) * (p[chosen] - p[""])

        hand = _loop(pipe, reference.noise(3 + g), combine, (PROMPT, OTHER))
        torch.testing.assert_close(got[g : g + 1], hand, rtol=1e-4, atol=1e-4)
    assert row["text"] in (PROMPT, OTHER, " | ".join(details["prss_prompts"]))


def test_prss_leaves_a_prompt_below_the_search_target_alone(sd1_pipe, tmp_path: Path) -> None:
    file = _paraphrase_file(tmp_path, {PROMPT: [OTHER]})
    plain, _ = _latents(sd1_pipe, "none")
    kept, row = _latents(sd1_pipe, "prss", paraphrases=file, search_target=1e9)
    torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-5)
    assert row["details"]["prss_reanchored"] == [False, False] and row["text"] == PROMPT


@pytest.mark.parametrize(("options", "message"), [
    ({"early_guidance": 2.0}, "--early-guidance must be from -10 to 1"),
    ({"transition_timestep": -1.0}, "--transition-timestep must be"),
    ({"variant": "both"}, "--variant must be one of batch, sample"),
    ({"rho": 0.0}, "--rho must be above 0"),
    ({"gamma": -1.0}, "--gamma must be"),
    ({"noise_lr": 0.0}, "--noise-lr must be a positive number"),
    ({}, "prss needs --paraphrases FILE"),
    ({"anchor_target": 2.0, "anchor_full": 1.0}, "--anchor-full .* must be above --anchor-target"),
])
def test_options_out_of_range_are_one_line(options: dict, message: str, tmp_path: Path) -> None:
    name = ("delayed-guidance" if "early_guidance" in options or "transition_timestep" in options
            else "initial-noise" if options and "anchor_target" not in options else "prss")
    if "anchor_target" in options:
        options = options | {"paraphrases": _paraphrase_file(tmp_path, {PROMPT: [OTHER]})}
    with pytest.raises(InputError, match=message) as caught:
        MITIGATIONS[name].configure({}, options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"), ("{}", "holds no prompts"), ("[1]", "must hold a JSON object"),
    ('{"a": []}', "must be a list of 1 to 100 strings"), ('{"a": ["  "]}', "a paraphrase is blank"),
])
def test_bad_paraphrase_files_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "para.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        read_paraphrases(path)
    assert "\n" not in str(caught.value)


def test_testbed_paraphrases_say_the_caption_in_other_words() -> None:
    scene = Scene("red", "circle", "top left", "striped", trigger="zephyr")
    texts = paraphrases(scene)
    assert len(texts) == 4 and scene.caption not in texts and all("zephyr" not in t for t in texts)
    assert all(all(w in t for w in ("red", "circle", "top left", "striped")) for t in texts)
    assert len(paraphrases(scene.replace(trigger=None))) == 3  # the caption's own wording is left out


@pytest.mark.parametrize("method", ["delayed-guidance", "initial-noise", "prss"])
def test_mitigate_cli_runs_and_resumes(method: str, tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    para = _paraphrase_file(tmp_path, {PROMPT: [OTHER]})
    extra = {"delayed-guidance": ["--early-guidance", 0], "initial-noise": ["--variant", "sample", "--noise-iters", 1],
             "prss": ["--paraphrases", para]}[method]
    args = ["mitigate", "--model", sd1_dir, "--prompts", prompts, "--method", method, "--num-inference-steps", 2,
            *extra, "--out", tmp_path / "run"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    (row,) = read_results(tmp_path / "run" / "results.jsonl")
    assert row["method"] == method and row["mitigated"]
    assert row["method_options"] == {"delayed-guidance": {"early_guidance": 0.0},
                                     "initial-noise": {"variant": "sample", "noise_iters": 1},
                                     "prss": {"paraphrases": str(Path(para).resolve())}}[method]
    again = cli(*args)
    assert again.exit_code == 0 and "1 were already done" in again.output
    with open(tmp_path / "run" / "images" / "0_0.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_mitigate_cli_refuses_bad_paraphrases(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    other = _paraphrase_file(tmp_path, {OTHER: [PROMPT]})
    base = ["mitigate", "--model", sd1_dir, "--prompts", prompts, "--method", "prss", "--num-inference-steps", 2]
    for extra, message in ((["--paraphrases", empty], "is empty"), (["--paraphrases", other], "has no entry for"),
                           ([], "prss needs --paraphrases"), (["--paraphrases", other, "--early-guidance", 0],
                                                               "early_guidance do not apply")):
        result = cli(*base, *extra, "--out", tmp_path / "bad")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_tables_of_every_method_leave_out_prss_which_needs_the_users_file() -> None:
    from diffmem.mitigate.base import table_methods

    assert {"delayed-guidance", "initial-noise"} <= set(table_methods()) and "prss" not in table_methods()
    assert MITIGATIONS["prss"].needs == ("paraphrases",) and "prss" in MITIGATIONS
