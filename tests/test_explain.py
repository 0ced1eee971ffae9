"""Token significance: the gradient matches a finite difference, words group BPE pieces, edits are scored."""

from __future__ import annotations

import pytest
import torch

from diffmem.detectors.base import encode_text
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.errors import InputError
from diffmem.explanation.attribution import candidate_edits, explain, gradient_significance, suggest_edits
from diffmem.explanation.render import html_highlight, png_chart, terminal_chart

PROMPT = "a large red-circle at the top, left"


def test_gradient_score_equals_detector_score(pipe) -> None:
    _, score = gradient_significance(pipe, PROMPT, generations=2, seed=1)
    assert score == pytest.approx(MagnitudeDetector(pipe, generations=2, seed=1).score([PROMPT])[0].score, rel=1e-4)


def test_gradient_matches_a_finite_difference(sd1_pipe) -> None:
    """Moving the conditioning along its gradient changes the loss by grad . step (to first order)."""
    pipe = sd1_pipe
    per_pos, _ = gradient_significance(pipe, PROMPT)
    pos = int(per_pos[1:10].argmax()) + 1
    cond = encode_text(pipe, [PROMPT]).detach().requires_grad_(True)
    uncond = encode_text(pipe, [""]).detach()
    from diffmem.detectors.base import initial_noise

    x = initial_noise(pipe, 1, 0)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    t = sched.timesteps[0]

    def loss(c):
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, c])).sample
        return (out[1] - out[0]).norm()

    (g,) = torch.autograd.grad(loss(cond), cond)
    assert float(g[0, pos].norm()) == pytest.approx(float(per_pos[pos]), rel=1e-3)
    h = 1e-3 * g / g.norm()
    with torch.no_grad():
        fd = (loss(cond + h) - loss(cond - h)) / 2
    assert float(fd) == pytest.approx(float((g * h).sum()), rel=2e-2)


def test_leave_one_out_is_the_default(pipe) -> None:
    # it ranks better than the gradient on the testbed (docs/results.md, "Explanation on v2")
    assert explain(pipe, PROMPT).method == "leave-one-out"


def test_words_merge_bpe_pieces(pipe) -> None:
    attr = explain(pipe, PROMPT, method="gradient")
    assert [w.text for w in attr.words] == PROMPT.split()
    red = attr.words[2]
    assert len(red.tokens) == 3  # red, -, circle
    assert red.significance == pytest.approx(float(attr.token_significance[red.tokens].sum()), rel=1e-5)
    assert len(attr.tokens) == len(attr.token_significance) == sum(len(w.tokens) for w in attr.words)
    assert attr.padding_significance is not None and attr.padding_significance > 0
    assert set(attr.to_dict()) >= {"tokens", "words", "score"}


def test_leave_one_out_is_the_score_drop(pipe) -> None:
    attr = explain(pipe, PROMPT, method="leave-one-out")
    words = PROMPT.split()
    det = MagnitudeDetector(pipe)
    for i in (0, 3):
        variant = " ".join(words[:i] + words[i + 1 :])
        drop = attr.score - det.score([variant])[0].score
        assert attr.words[i].significance == pytest.approx(drop, abs=1e-4)


def test_truncated_words_are_reported(pipe) -> None:
    long = " ".join(["dog"] * 80) + " tail"
    attr = explain(pipe, long)
    assert attr.words[-1].truncated and attr.cut_off.endswith("tail")
    assert len(attr.token_significance) == pipe.tokenizer.model_max_length - 2


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt_is_an_input_error(pipe, bad: str) -> None:
    with pytest.raises(InputError, match="empty"):
        explain(pipe, bad)


def test_unknown_method(pipe) -> None:
    with pytest.raises(InputError, match="unknown method"):
        explain(pipe, PROMPT, method="magic")


def test_suggestions_are_below_threshold_least_change_first(pipe) -> None:
    attr = explain(pipe, PROMPT)
    edits = candidate_edits(attr)
    assert edits and all(p != PROMPT for p, _, _ in edits)
    threshold = attr.score  # anything that lowers the score qualifies
    found = suggest_edits(pipe, attr, threshold, max_results=10)
    assert found and all(s.score < threshold for s in found)
    assert [s.n_changed for s in found] == sorted(s.n_changed for s in found)
    rescored = MagnitudeDetector(pipe).score([found[0].prompt])[0].score
    assert rescored == pytest.approx(found[0].score, rel=1e-4)


def test_renderers(pipe, tmp_path) -> None:
    attr = explain(pipe, PROMPT)
    html = html_highlight(attr)
    assert html.count("diffmem-word") == len(attr.words) and "red-circle" in html
    assert png_chart(attr, tmp_path / "a.png").stat().st_size > 1000
    assert terminal_chart(attr).row_count == len(attr.words)


def test_cli_explain_json_and_suggestions(sd1_dir, cli, tmp_path) -> None:
    res = cli("explain", PROMPT, "--model", sd1_dir, "--json", "--suggest", "--threshold", 10.0,
              "--plot", tmp_path / "w.png")
    assert res.exit_code == 0, res.stdout
    out = __import__("json").loads(res.stdout)
    assert [w["text"] for w in out["words"]] == PROMPT.split()
    assert {"tokens", "words", "score", "suggestions"} <= set(out)
    assert out["suggestions"] and all(s["score"] < 10.0 for s in out["suggestions"])
    assert (tmp_path / "w.png").stat().st_size > 1000


@pytest.mark.parametrize(("args", "expected"), [
    (["", ], "empty"),
    (["a cat", "--method", "magic"], "--method"),
    (["a cat", "--suggest"], "--threshold"),
])
def test_cli_explain_errors(args, expected, sd1_dir, cli) -> None:
    res = cli("explain", *args, "--model", sd1_dir)
    assert res.exit_code == 2 and expected in res.stderr and "Traceback" not in res.stderr


def test_explain_config_checks_every_setting_once() -> None:
    from diffmem.explanation.attribution import ExplainConfig

    assert ExplainConfig().to_dict() == {"generations": 1, "seed": 0, "num_inference_steps": 50,
                                         "method": "leave-one-out", "steps": "first", "guidance_scale": None}
    assert ExplainConfig(steps="all", num_inference_steps=4).n_steps == 4
    for values, fragment in (
        ({"method": "magic"}, "unknown method 'magic': --method must be one of gradient, leave-one-out"),
        ({"steps": 99}, "--steps 99 must be between 1 and num_inference_steps (50)"),
        ({"generations": 0}, "--generations must be at least 1"),
        ({"seed": -1}, "--seed must be a whole number from 0"),
        ({"guidance_scale": 0.5}, "--guidance must be 1 or more"),
    ):
        with pytest.raises(InputError) as info:
            ExplainConfig(**values)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_leave_one_out_refuses_more_words_than_its_budget(pipe) -> None:
    from diffmem.explanation.attribution import MAX_EXPLAIN_WORDS, ExplainConfig

    longest, over = " ".join(["dog"] * MAX_EXPLAIN_WORDS), " ".join(["dog"] * (MAX_EXPLAIN_WORDS + 1))
    assert len(ExplainConfig().check_prompt(longest)) == MAX_EXPLAIN_WORDS
    assert len(ExplainConfig(method="gradient").check_prompt(over)) == MAX_EXPLAIN_WORDS + 1  # its cost is fixed
    with pytest.raises(InputError, match=f"has {MAX_EXPLAIN_WORDS + 1} words; leave-one-out explains at most "
                                         f"{MAX_EXPLAIN_WORDS}"):
        explain(pipe, over)


def test_keywords_override_a_given_config(pipe) -> None:
    from diffmem.explanation.attribution import ExplainConfig

    attr = explain(pipe, PROMPT, config=ExplainConfig(generations=2, seed=3), seed=1)
    assert (attr.settings["generations"], attr.settings["seed"]) == (2, 1)
    assert attr.score == pytest.approx(MagnitudeDetector(pipe, generations=2, seed=1).score([PROMPT])[0].score,
                                       rel=1e-5)


def test_the_command_and_the_page_refuse_an_over_long_prompt_before_scoring(pipe, cli) -> None:
    from diffmem.app.service import LimitError, Service, Threshold
    from diffmem.explanation.attribution import MAX_EXPLAIN_WORDS

    over = " ".join(["dog"] * (MAX_EXPLAIN_WORDS + 1))
    result = cli("explain", over, "--model", "testbed")
    assert result.exit_code == 2 and "loading" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: the prompt has {MAX_EXPLAIN_WORDS + 1} words; leave-one-out explains at most {MAX_EXPLAIN_WORDS} "
        "(one denoiser row per word and generation): shorten it"]
    service = Service(pipe, "testbed", Threshold(0.5, "a test"))
    short_words = " ".join(["a"] * (MAX_EXPLAIN_WORDS + 1))  # within the page's 1000 characters
    for call in (service.explain_prompt, service.analyse):
        with pytest.raises(LimitError, match="leave-one-out explains at most"):
            call(short_words)
