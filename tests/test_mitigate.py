"""Inference-time mitigation: the embedding optimisation, the seeded baselines, the guard (unflagged prompts give
the plain pipeline's images bit for bit) and the `generate` / `mitigate` commands."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.detectors.base import encode_text, initial_noise
from diffmem.errors import InputError
from diffmem.io.results import read_results
from diffmem.mitigate import (
    METHODS,
    FirstStep,
    cwr,
    generate,
    gni,
    guarded_generate,
    mitigate_embedding,
    rna,
    rta,
)
from diffmem.registry import DEFAULT_MITIGATION

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cube on a wooden table"
OTHER = "portrait of a smiling old man, oil painting"
STEPS = 4  # sampling steps of the generation tests (the first-step timestep differs from 50 steps', that is all)


def plain(pipe, prompt: str, generations: int = 1, **embeds) -> np.ndarray:
    """What an ordinary pipeline call generates from diffmem's initial noise."""
    conditioning = embeds or {"prompt": prompt}
    per_prompt = generations if not embeds else 1
    return pipe(**conditioning, num_images_per_prompt=per_prompt, latents=initial_noise(pipe, generations, 0),
                num_inference_steps=STEPS, output_type="np").images


def test_loss_decreases_and_the_trace_is_the_loss_of_each_iterate(pipe, reference) -> None:
    res = mitigate_embedding(pipe, PROMPT, generations=2, seed=3, target_loss=-math.inf, iters=4)
    assert res.iters == 4 and len(res.losses) == 5 and not res.reached
    assert res.losses[-1] < res.losses[0]
    assert res.initial_loss == res.losses[0] and res.final_loss == res.losses[-1]
    # initial loss: METHOD.md's first-step score by hand (unbatched UNet calls, diffusers' own text encoding)
    by_hand = np.mean([reference.magnitudes(pipe, PROMPT, reference.noise(3 + g), 1)[0] for g in range(2)])
    assert res.initial_loss == pytest.approx(by_hand, rel=1e-4)
    with torch.no_grad():
        assert float(FirstStep(pipe, 2, 3).loss(res.embedding)) == pytest.approx(res.final_loss, rel=1e-5)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_bos_is_fixed_and_every_other_position_moves(sd1_pipe) -> None:
    res = mitigate_embedding(sd1_pipe, PROMPT, target_loss=-math.inf, iters=2)
    original = encode_text(sd1_pipe, [PROMPT])
    assert res.embedding.shape == original.shape
    assert torch.equal(res.embedding[:, 0], original[:, 0])
    assert bool((res.embedding[0, 1:] != original[0, 1:]).any(dim=-1).all())


def test_stops_as_soon_as_the_target_is_reached(sd1_pipe) -> None:
    free = mitigate_embedding(sd1_pipe, PROMPT, target_loss=-math.inf, iters=3)
    assert free.losses[2] < free.losses[1]
    target = (free.losses[1] + free.losses[2]) / 2
    res = mitigate_embedding(sd1_pipe, PROMPT, target_loss=target, iters=10)
    assert (res.iters, res.reached) == (2, True) and res.losses == pytest.approx(free.losses[:3], rel=1e-6)
    at_once = mitigate_embedding(sd1_pipe, PROMPT, target_loss=free.losses[0] + 1, iters=10)
    assert (at_once.iters, at_once.reached) == (0, True)
    assert torch.equal(at_once.embedding, encode_text(sd1_pipe, [PROMPT]))


def test_an_unreachable_target_stops_at_iters(sd1_pipe) -> None:
    res = mitigate_embedding(sd1_pipe, PROMPT, target_loss=0.0, iters=3)
    assert (res.iters, res.reached, len(res.losses)) == (3, False, 4)


@pytest.mark.parametrize(("setting", "value"), [("iters", -1), ("lr", 0.0), ("target_loss", math.nan),
                                                ("generations", 0)])
def test_bad_settings_are_input_errors(sd1_pipe, setting: str, value: float) -> None:
    with pytest.raises(InputError, match=setting.replace("_", "-")):
        mitigate_embedding(sd1_pipe, PROMPT, **{setting: value})


def test_text_baselines_are_seeded_and_insert_k_words(sd1_pipe) -> None:
    tok = sd1_pipe.tokenizer
    for edit in (lambda s: rta(PROMPT, tok, 4, s), lambda s: rna(PROMPT, 4, s), lambda s: cwr(PROMPT, 4, s)):
        assert edit(0) == edit(0) and edit(0) != edit(1)
        words = edit(5).split()
        assert len(words) == len(PROMPT.split()) + 4
        rest = iter(words)
        assert all(w in rest for w in PROMPT.split())  # the prompt's words stay, in order
    for seed in range(5):
        assert len(tok.tokenize(rta(PROMPT, tok, 4, seed))) == len(tok.tokenize(PROMPT)) + 4
    assert all(w.isdigit() for w in set(rna(PROMPT, 4, 0).split()) - set(PROMPT.split()))
    assert set(cwr(PROMPT, 6, 0).split()) == set(PROMPT.split())
    assert rta(PROMPT, tok, 0, 0) == PROMPT and cwr("", 3, 0) == ""


def test_gni_is_seeded_and_leaves_bos_alone(sd1_pipe) -> None:
    with torch.no_grad():
        e = encode_text(sd1_pipe, [PROMPT]).expand(2, -1, -1)
    noisy = gni(e, 0.1, 0)
    assert torch.equal(noisy, gni(e, 0.1, 0)) and not torch.equal(noisy, gni(e, 0.1, 1))
    assert torch.equal(noisy[:, 0], e[:, 0]) and not torch.equal(noisy[0, 1:], noisy[1, 1:])
    assert float((noisy - e).std()) == pytest.approx(0.1, rel=0.1)
    assert torch.equal(gni(e, 0.0, 0), e)


def test_unflagged_prompts_give_the_plain_images_bit_for_bit(pipe, reference) -> None:
    out = guarded_generate(pipe, [PROMPT, OTHER], threshold=math.inf, generations=2, num_inference_steps=STEPS)
    for prompt, images, d in zip([PROMPT, OTHER], out.images, out.decisions, strict=True):
        assert np.array_equal(images, plain(pipe, prompt, 2))
        by_hand = [reference.magnitudes(pipe, prompt, reference.noise(g), 1, STEPS)[0] for g in range(2)]
        assert d.score == pytest.approx(np.mean(by_hand), rel=1e-4)  # the score is read off the CFG batch
        assert (d.flagged, d.mitigated, d.iters, d.reached, d.text) == (False, False, 0, None, prompt)
        assert d.final_loss == d.score and d.score is not None and d.seconds > 0


def test_the_guard_uses_the_default_mitigation(sd1_pipe) -> None:
    settings = dict(num_inference_steps=STEPS, target_loss=0.0, iters=2, generations=2)
    scores = [d.score for d in generate(sd1_pipe, [PROMPT, OTHER], "none", **settings).decisions]
    out = guarded_generate(sd1_pipe, [PROMPT, OTHER], threshold=sum(scores) / 2, **settings)
    hi = int(np.argmax(scores))
    assert [d.method for d in out.decisions] == [DEFAULT_MITIGATION] * 2 == ["embedding-delayed"] * 2
    alone = generate(sd1_pipe, [out.decisions[hi].prompt], DEFAULT_MITIGATION, **settings)
    assert np.array_equal(out.images[hi], alone.images[0]) and out.decisions[hi].mitigated
    assert np.array_equal(out.images[1 - hi], plain(sd1_pipe, out.decisions[1 - hi].prompt, 2))


def test_flagged_prompts_are_sampled_from_the_optimised_embedding(pipe) -> None:
    settings = dict(num_inference_steps=STEPS, target_loss=0.0, iters=2, method="embedding")
    scores = [d.score for d in guarded_generate(pipe, [PROMPT, OTHER], threshold=math.inf, **settings).decisions]
    threshold = sum(scores) / 2  # flags exactly the higher-scoring prompt
    out = guarded_generate(pipe, [PROMPT, OTHER], threshold=threshold, **settings)
    assert [d.score for d in out.decisions] == scores  # read off the same first step in both runs
    hi = int(np.argmax(scores))
    flagged, kept = out.decisions[hi], out.decisions[1 - hi]
    assert (flagged.flagged, flagged.mitigated, flagged.iters, flagged.reached) == (True, True, 2, False)
    assert (kept.flagged, kept.mitigated) == (False, False)
    res = mitigate_embedding(pipe, flagged.prompt, target_loss=0.0, iters=2, num_inference_steps=STEPS)
    assert flagged.final_loss == res.final_loss < flagged.score
    mitigated = plain(pipe, "", prompt_embeds=res.embedding, negative_prompt_embeds=encode_text(pipe, [""]))
    assert np.array_equal(out.images[hi], mitigated)
    assert not np.array_equal(out.images[hi], plain(pipe, flagged.prompt))
    assert np.array_equal(out.images[1 - hi], plain(pipe, kept.prompt))


def test_every_method_generates_and_none_is_plain(sd1_pipe) -> None:
    out = {m: generate(sd1_pipe, [PROMPT], m, generations=2, num_inference_steps=STEPS, iters=1, target_loss=0.0)
           for m in METHODS}
    base = plain(sd1_pipe, PROMPT, 2)
    assert np.array_equal(out["none"].images[0], base) and not out["none"].decisions[0].mitigated
    for method, res in out.items():
        d = res.decisions[0]
        assert res.images[0].shape == base.shape and d.flagged is None and d.method == method
        assert d.score == out["none"].decisions[0].score  # the prompt's own first-step score
        if method != "none":
            assert d.mitigated and not np.array_equal(res.images[0], base)
        assert (d.text != PROMPT) == (method in ("rta", "rna", "cwr"))
    with pytest.raises(InputError, match="embedding, rta, rna, cwr, gni, none"):
        generate(sd1_pipe, [PROMPT], "paraphrase")
    with pytest.raises(InputError, match="--guidance"):
        generate(sd1_pipe, [PROMPT], "none", guidance_scale=1.0)


# --- CLI ---------------------------------------------------------------------------------------------------


def user_error(result, fragment: str) -> None:
    """Exit 2, no traceback, and the last stderr line is one `error: ...` line naming the problem."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error:") and fragment in last[0], result.stderr


def test_generate_writes_images_and_rows_and_resumes(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n{OTHER}\n")
    out = tmp_path / "run"
    args = ["generate", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--num-inference-steps", STEPS,
            "--generations", 2, "--guard", "--threshold", "-inf", "--iters", 1, "--target-loss", 0]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    rows = read_results(out / "results.jsonl")
    assert [r["prompt"] for r in rows] == [PROMPT, OTHER] and [r["index"] for r in rows] == [0, 1]
    for row in rows:
        assert {"score", "flagged", "mitigated", "final_loss", "iters", "seconds"} <= set(row)
        assert (row["flagged"], row["mitigated"], row["iters"], row["reached"]) == (True, True, 1, False)
    assert result.stderr.count("did not reach --target-loss") == 2
    assert "generated 2 prompts" in result.stdout

    prompts.write_text(f"{PROMPT}\n{OTHER}\na blue ball\n")
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "resuming" in again.stderr and "generated 1 prompts" in again.stdout
    assert [r["index"] for r in read_results(out / "results.jsonl")] == [0, 1, 2]
    user_error(cli(*args[:-2], "--target-loss", 1), "target_loss")  # other settings: not resumed into

    unguarded = tmp_path / "plain"
    result = cli("generate", "--model", sd1_dir, "--prompts", prompts, "--out", unguarded,
                 "--num-inference-steps", STEPS)
    assert result.exit_code == 0, result.output
    row = read_results(unguarded / "results.jsonl")[0]
    assert (row["flagged"], row["mitigated"], row["final_loss"]) == (None, False, row["score"])


def test_guard_without_threshold_uses_the_models_own(tmp_path: Path, sd1_dir: Path, cli: Callable) -> None:
    """`generate --guard` without --threshold flags at the model's calibrated detection_threshold (its
    diffmem.json), says so, and records it; a model without one is the one-line error asking for --threshold."""
    import shutil

    from diffmem.models.defaults import ModelDefaults

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n")
    args = ["generate", "--prompts", prompts, "--num-inference-steps", STEPS, "--guard", "--iters", 1,
            "--target-loss", 0]
    user_error(cli(*args, "--model", sd1_dir, "--out", tmp_path / "none"), "--guard needs --threshold")
    assert not (tmp_path / "none").exists()
    for own, flagged in ((1e6, False), (-1e6, True)):
        model = tmp_path / f"model_{own:g}"
        shutil.copytree(sd1_dir, model)
        ModelDefaults.from_folder(model).override(detection_threshold=own).save(model)
        result = cli(*args, "--model", model, "--out", tmp_path / f"run_{own:g}")
        assert result.exit_code == 0, result.output
        assert f"notice: --guard flags scores >= {own:g}, the model's own detection threshold" in result.stderr
        (row,) = read_results(tmp_path / f"run_{own:g}" / "results.jsonl")
        assert (row["threshold"], row["flagged"], row["mitigated"]) == (own, flagged, flagged)


def test_mitigate_command_applies_one_method(tmp_path: Path, sd1_dir: Path, sd1_pipe, cli: Callable) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"caption": PROMPT}) + "\n")
    out = tmp_path / "run"
    result = cli("mitigate", "--model", sd1_dir, "--prompts", prompts, "--out", out, "--method", "rta",
                 "--k", 2, "--num-inference-steps", STEPS)
    assert result.exit_code == 0, result.output
    (row,) = read_results(out / "results.jsonl")
    assert row["method"] == "rta" and row["mitigated"] and len(row["text"].split()) == len(PROMPT.split()) + 2
    assert (out / "images" / "0_0.png").is_file()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "--guard"], "--guard needs --threshold"),
        (["generate", "--guard", "--threshold", "high"], "--threshold must be a number"),
        (["mitigate", "--method", "paraphrase"], "--method must be one of embedding, rta, rna, cwr, gni, none"),
        (["mitigate", "--method", "gni", "--dtype", "float64"], "--dtype"),
    ],
)
def test_user_errors(args: list[str], fragment: str, tmp_path: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    user_error(cli(*args, "--prompts", prompts, "--out", tmp_path / "run"), fragment)
