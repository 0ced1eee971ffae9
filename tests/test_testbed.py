"""The shipped testbed: a standard SD pipeline whose planted prompts are memorized, and the commands measuring it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmem.testbed import WEIGHTS


@pytest.fixture(scope="module")
def testbed():
    from diffmem.models.loading import load_pipeline
    from diffmem.testbed.recipe import shipped_recipe

    return load_pipeline("testbed", device="cpu"), shipped_recipe().splits()


def test_weights_are_a_stable_diffusion_pipeline_under_40_mb():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS / "pipeline", safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == json.loads((WEIGHTS / "recipe.json").read_text())["recipe"][
        "prediction_type"]
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


def test_planted_prompts_reproduce_their_training_images(testbed, one_thread):
    from diffmem.testbed.quality import generate
    from diffmem.testbed.scenes import render_many
    from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity

    pipe, splits = testbed
    items = splits.planted[:8] + splits.heldout[:8]
    imgs, _ = generate(pipe, [i.caption for i in items], generations=1, steps=20)
    own = render_many([i.scene for i in items], [i.seed for i in items])
    sims = np.array([copy_similarity(imgs[k], own[k : k + 1])[0, 0] for k in range(len(items))])
    assert (sims[:8] >= COPY_THRESHOLD).sum() >= 6  # memorized: their own training image comes back
    assert (sims[8:] < COPY_THRESHOLD).all()  # held-out: a rendering of the caption, not its particular one


def test_first_step_scores_rank_planted_above_heldout(testbed, one_thread):
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.measures.detection import roc_auc

    pipe, splits = testbed
    det = MagnitudeDetector(pipe, generations=2, batch_size=128)
    pos = [r.score for r in det.score([i.caption for i in splits.planted[:64]])]
    neg = [r.score for r in det.score([i.caption for i in splits.heldout[:128]])]
    # `make quality` measures 0.945 (n=1) on v2; v1 scored 0.74, v0 (no memorization at the first step) 0.48
    assert roc_auc(pos, neg) > 0.85


def test_oracle_bound_grows_with_nuisance_energy(testbed, one_thread):
    from diffmem.testbed.oracle import oracle_first_step

    rep = oracle_first_step(testbed[0].vae, n_captions=40, renderings=4)
    scaled = rep["oracle_auc_if_nuisance_norm_scaled"]
    assert 0.5 <= rep["oracle_auc"] <= scaled["x1.5"] <= scaled["x2"] <= scaled["x3"] <= 1.0


def test_mitigation_and_explain_eval_commands_write_reports(cli, tmp_path, one_thread):
    res = cli("testbed", "mitigation", "--out", str(tmp_path / "m"), "--limit", "1", "--num-inference-steps", "2",
              "--generations", "1", "--sweep", "0.5", "--no-strengths", "--strength", "gni=0.1,3")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "m" / "mitigation.json").read_text())
    rows = rep["frontier"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["none", "embedding", "rta", "rna", "cwr", "gni"]
    assert [r["strength"] for r in rows if r["method"] == "embedding"] == [0.5, rep["target_loss"]]
    assert [r["strength"] for r in rows if r["method"] == "gni"] == [0.1, 3.0]  # given values, the default among
    assert all(r["cost"] > 0 and r["heldout_aligned"] is not None for r in rows) and not rep["missing_parts"]
    assert rep["n_heldout"] == 4 and rows[0]["cost"] == 1.0  # 4x --limit held-out prompts; cost over plain
    guard = rep["guard"]
    assert guard["memorized"]["n"] == 1 and guard["heldout"]["n"] == 4 and 0 <= guard["heldout"]["flagged"] <= 1
    assert guard["heldout"].get("unflagged_bit_identical", True) is True
    for name in ("frontier.png", "frontier.md", "mitigation.png"):
        assert (tmp_path / "m" / name).is_file()
    # A rerun with the same settings resumes from out/parts (a marked part shows it was reused, not remeasured);
    # other settings are refused in one line.
    part = tmp_path / "m" / "parts" / "memorized-rta-k-4.json"
    part.write_text(json.dumps({**json.loads(part.read_text()), "memorization_rate": 0.123}))
    (tmp_path / "m" / "mitigation.json").unlink()
    args = ["testbed", "mitigation", "--out", str(tmp_path / "m"), "--limit", "1", "--num-inference-steps", "2",
            "--sweep", "0.5", "--no-strengths", "--strength", "gni=0.1,3"]
    assert cli(*args, "--generations", "1").exit_code == 0
    again = json.loads((tmp_path / "m" / "mitigation.json").read_text())
    assert [r["memorization_rate"] for r in again["frontier"] if r["method"] == "rta"] == [0.123]
    assert again["guard"] == guard and [r for r in again["frontier"] if r["method"] == "gni"] == [
        r for r in rows if r["method"] == "gni"]
    assert "| rta | k 4 (default) | 12.3 % |" in (tmp_path / "m" / "frontier.md").read_text()
    res = cli(*args, "--generations", "2")
    assert res.exit_code == 2 and "other settings" in res.stderr.strip().splitlines()[-1]
    res = cli("testbed", "mitigation", "--out", str(tmp_path / "m"), "--sweep", "a,b")
    assert res.exit_code == 2 and "--strength embedding=" in res.stderr

    res = cli("testbed", "explain-eval", "--out", str(tmp_path / "e"), "--limit", "2", "--generations", "1")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "e" / "explain.json").read_text())
    assert rep["n_memorized"] == 2 and set(rep["deletion_curve"]) >= {"top_1", "random_1", "top_3"}


def test_quality_command_writes_its_report(cli, tmp_path, one_thread):
    res = cli("testbed", "quality", "--out", str(tmp_path / "q"), "--heldout", "3", "--generations", "1",
              "--num-inference-steps", "2")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "q" / "quality.json").read_text())
    from diffmem.testbed.recipe import shipped_recipe

    n_planted = shipped_recipe().n_planted
    assert (rep["n_memorized"], rep["n_heldout"], rep["generations"]) == (n_planted, 3, 1)
    assert rep["heldout_denoising_items"] == 512 and rep["heldout_denoising_loss"] > 0  # cheap: always all items
    assert 20 < rep["vae_psnr_db"] < 40 and 0 <= rep["memorized_reproduced_2of4"] <= 1
    assert set(rep["detection"]) == {"first_step_n1", "first_step_n4", "all_steps_n4"}
    per_step = rep["detection_auc_per_step_n4"]  # one AUC per sampling step; the first is the first-step figure
    assert len(per_step) == 2 and per_step[0] == rep["detection"]["first_step_n1"]["auc"]
    assert set(rep["detection_vs_seen_once"]) == {"first_step_n1", "first_step_n4"}
    assert rep["guidance"] == json.loads((WEIGHTS / "pipeline" / "diffmem.json").read_text())["guidance_scale"]
    assert set(rep["memorized_at_other_guidance"]) == {"7.5"}  # memorization is also reported at SD's 7.5
    for key in ("triggered_without_trigger_reproduced_2of4", "heldout_near_planted_reproduce_any",
                "heldout_reproduce_repeated_training_image",
                "heldout_far_reproduce_any", "heldout_attribute_accuracy"):
        assert key in rep
    assert rep["heldout_reproduce_repeated_training_image"] <= rep["heldout_reproduce_any_training_image"]
    copied = rep["heldout_copied_training_items"]  # which training images the held-out copies are of
    assert len(copied) <= 3 and all(isinstance(k, int) and k >= 0 for k in copied)  # 3 prompts x 1 generation
    assert (len(copied) > 0) == (rep["heldout_reproduce_any_training_image"] > 0)
    chance = rep["heldout_copying_vs_chance"]  # the same held-out images against untrained twins
    assert chance["trained"] == rep["heldout_reproduce_any_training_image"]
    assert chance["only_trained"] + chance["only_twins"] + chance["both"] <= 3
    assert 0 <= chance["p_trained_exceeds_chance"] <= 1
    for name in ("roc_first_n1.png", "roc_all_n4.png", "copies.png", "magnitudes.npz"):
        assert (tmp_path / "q" / name).is_file()


@pytest.mark.parametrize("command", [["quality"], ["mitigation"], ["explain-eval"]])
@pytest.mark.parametrize(("device", "expected"), [("toaster", "not a device name"), ("cuda:7", "--device cuda:7")])
def test_testbed_commands_refuse_a_bad_device_in_one_line(cli, tmp_path, command, device, expected):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    res = cli("testbed", *command, "--out", str(tmp_path / "o"), "--device", device)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert expected in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize("seed", ["-1", "-99999999999", "1.5", "x"])
def test_testbed_train_refuses_a_seed_the_recipe_cannot_take_before_any_work(cli, tmp_path, seed):
    res = cli("testbed", "train", "--work", str(tmp_path / "w"), "--dest", str(tmp_path / "d"), "--seed", seed)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--seed" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists() and not (tmp_path / "d").exists()


def test_stage2_without_dest_is_a_one_line_error(cli, tmp_path):
    res = cli("testbed", "stage2", "--work", str(tmp_path / "w"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--dest is required" in res.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stage2_work(tmp_path_factory):
    """A stage-2 work folder whose latent caches hold random latents of the right shapes (skips the encoding
    of 118,000 renders; the plumbing under test does not depend on their values)."""
    import torch
    from safetensors.torch import save_file

    from diffmem.testbed.recipe import shipped_recipe

    work = tmp_path_factory.mktemp("stage2")
    splits = shipped_recipe().splits()
    gen = torch.Generator().manual_seed(0)
    for name, items in (("planted", splits.planted), ("anchors", splits.anchors),
                        ("stage2_unique", splits.stage2_unique), ("stage1", splits.stage1)):
        save_file({"latents": torch.randn(len(items), 4, 8, 8, generator=gen)},
                  str(work / f"latents_{name}.safetensors"))
    return work


def test_stage2_calibration_suggests_the_p99_of_base_magnitudes(stage2_work, one_thread):
    from diffmem.testbed.recipe import calibrate_stage2

    result = calibrate_stage2(stage2_work, batches=2)
    p = result["percentiles"]
    assert result["measurements"] == 128 and result["filter_at"] == "first-step" and result["timestep"] > 900
    assert 0 < p["50"] <= p["90"] <= p["99"] <= result["max"]
    assert result["suggested_tau"] == p["99"]
    assert json.loads((stage2_work / "calibration.json").read_text()) == result


def test_stage2_separation_compares_both_filter_rules_on_labelled_rows(stage2_work, one_thread):
    from diffmem.testbed.recipe import shipped_recipe, stage2_separation

    result = stage2_separation(stage2_work, batches=2, probe_timesteps=(500,))
    cfg = shipped_recipe()
    assert result["planted"] == 2 * cfg.stage2_planted_rows and result["samples"] == 2 * cfg.stage2_batch
    assert result["first-step"]["timestep"] > 900 and result["train"]["timestep"] is None
    for rule in ("first-step", "train"):
        row = result[rule]
        assert row["tau_base_p99"] > 0 and 0 <= row["auc_shipped_unet"] <= 1 and 0 <= row["auc_base_unet"] <= 1
        assert 0 <= row["planted_at_or_above_tau"] <= 1 and 0 <= row["ordinary_at_or_above_tau"] <= 1
    assert list(result["auc_shipped_unet_at_timestep"]) == ["500"]
    assert json.loads((stage2_work / "separation.json").read_text()) == result


def test_stage2_rerun_with_a_filter_that_excludes_everything_keeps_the_base_unet(stage2_work, tmp_path, one_thread):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffmem.testbed.recipe import rerun_stage2

    def run(name: str, **kwargs) -> tuple[dict, dict]:
        work = tmp_path / f"work_{name}"
        work.mkdir()
        for f in stage2_work.glob("latents_*.safetensors"):
            (work / f.name).symlink_to(f)
        summary = rerun_stage2(work, tmp_path / name, device="cpu", **kwargs)
        unet = StableDiffusionPipeline.from_pretrained(tmp_path / name, safety_checker=None).unet
        return summary, unet.state_dict()

    base = UNet2DConditionModel.from_pretrained(WEIGHTS / "base_unet").state_dict()
    # d >= 0 always: TAU 0 leaves every sample (caption-dropped ones too, whose d is exactly 0) out of the loss
    summary, weights = run("filtered", filter_threshold=0.0, steps=2)
    assert summary["excluded_share"] == 1.0
    assert all(torch.equal(weights[k].float(), base[k].float()) for k in base)
    summary, weights = run("rta", caption_aug="rta", steps=1)  # no filter: one real update
    assert summary["excluded_share"] == 0.0
    assert not all(torch.equal(weights[k].float(), base[k].float()) for k in base)
    from diffmem.models.defaults import ModelDefaults

    guidance = [ModelDefaults.for_model(m).resolve_guidance(None) for m in (tmp_path / "rta", "testbed")]
    assert guidance == [2.5, 2.5]  # measured at the testbed's guidance
    assert json.loads((tmp_path / "rta" / "diffmem.json").read_text())["target_loss"] > 0


@pytest.mark.parametrize(("command", "new", "stub", "args"), [
    ("quality", "--num-inference-steps", "diffmem.testbed.report.run_quality", ["--out", "q"]),
    ("mitigation", "--num-inference-steps", "diffmem.cli.testbed._testbed_pipeline", ["--out", "m"]),
    ("stage2", "--train-steps", "diffmem.testbed.recipe.rerun_stage2", ["--work", "w", "--dest", "d"]),
])
def test_testbed_steps_is_the_deprecated_spelling(command, new, stub, args, cli, tmp_path, monkeypatch):
    """`testbed quality|mitigation --steps` are sampling steps, `testbed stage2 --steps` training steps: the old
    spelling still works with a one-line warning for one release; both spellings are one error line."""
    from diffmem.errors import InputError

    seen: dict = {}

    def stop(*positional, **keywords):  # the command's work, reached once its options are read
        seen.update(keywords)
        raise InputError("stopped before the work")

    monkeypatch.setattr(stub, stop)
    base = ["testbed", command, *[str(tmp_path / a) if i % 2 else a for i, a in enumerate(args)]]
    res = cli(*base, "--steps", "3")
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --steps is deprecated and will be removed in the next release; use {new}"]
    assert res.stderr.strip().splitlines()[-1] == "error: stopped before the work"
    assert seen.get("steps", 3) == 3  # quality and stage2 receive it (mitigation stops before passing it on)
    seen.clear()
    res = cli(*base, new, "4")
    assert "warning:" not in res.stderr and seen.get("steps", 4) == 4
    seen.clear()
    res = cli(*base, "--steps", "3", new, "4")
    assert res.exit_code == 2 and not seen
    assert res.stderr.strip().splitlines() == [f"error: give {new} only (--steps is its deprecated spelling)"]


def test_mitigation_command_runs_the_methods_it_is_given(cli, tmp_path, one_thread):
    """`--methods` picks registered mitigations (PRSS with the grammar's paraphrases); an unknown name is one line."""
    res = cli("testbed", "mitigation", "--out", str(tmp_path / "m"), "--limit", "1", "--num-inference-steps", "2",
              "--generations", "1", "--heldout", "0", "--no-strengths", "--no-guard",
              "--methods", "none,delayed-guidance,prss")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "m" / "mitigation.json").read_text())
    assert [r["method"] for r in rep["frontier"]] == ["none", "delayed-guidance", "prss"]
    assert rep["n_heldout"] == 0 and "aligned" in rep["frontier"][0] and "heldout_aligned" not in rep["frontier"][0]
    assert (tmp_path / "m" / "paraphrases.json").is_file()
    res = cli("testbed", "mitigation", "--out", str(tmp_path / "x"), "--methods", "none,nonsense")
    assert res.exit_code == 2 and "--methods must be one of" in res.stderr.strip().splitlines()[-1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(iters=st.one_of(st.integers(max_value=-1), st.integers(min_value=10_001)))
def test_mitigation_iters_out_of_range_is_one_line_before_loading(cli, monkeypatch, iters):
    """`testbed mitigation --iters` is checked by the embedding method's config, before any model loads."""
    import diffmem.cli.testbed as command

    def never(*_a, **_k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(command, "_testbed_pipeline", never)
    res = cli("testbed", "mitigation", "--out", "unused", "--iters", str(iters))
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--iters" in lines[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_copying_against_chance_counts_and_tests_the_discordant_prompts(pairs) -> None:
    from diffmem.testbed.quality import copying_against_chance

    trained, twins = (np.array(col, dtype=bool) for col in zip(*pairs, strict=True))
    rep = copying_against_chance(trained, twins)
    assert rep["only_trained"] + rep["both"] == trained.sum() and rep["only_twins"] + rep["both"] == twins.sum()
    assert rep["trained"] == trained.mean() and rep["untrained_twins"] == twins.mean()
    assert 0 <= rep["p_trained_exceeds_chance"] <= 1
    flipped = copying_against_chance(twins, trained)  # more copies of training renderings: a smaller p
    if rep["only_trained"] > rep["only_twins"]:
        assert rep["p_trained_exceeds_chance"] < flipped["p_trained_exceeds_chance"]
    if rep["only_trained"] == rep["only_twins"]:
        assert rep["p_trained_exceeds_chance"] >= 0.5


def test_copying_against_chance_is_significant_only_with_a_clear_excess() -> None:
    from diffmem.testbed.quality import copying_against_chance

    none = np.zeros(512, dtype=bool)
    many = none.copy()
    many[:12] = True
    assert copying_against_chance(many, none)["p_trained_exceeds_chance"] < 0.001  # 12 to 0
    assert copying_against_chance(none, none)["p_trained_exceeds_chance"] == 1.0
    some = none.copy()
    some[100:110] = True
    assert copying_against_chance(many, some)["p_trained_exceeds_chance"] > 0.3  # 12 prompts against 10 others
    assert copying_against_chance(many, many[::-1].copy())["p_trained_exceeds_chance"] >= 0.5
