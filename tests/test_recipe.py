"""The testbed recipe and the training loop: format, determinism, resume."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.testbed.recipe import RecipeConfig, run_recipe
from diffmem.testbed.tiny import tiny_pipeline
from diffmem.training.loop import TrainConfig, train

TINY = dict(n_stage1=64, n_planted=4, n_triggered=1, n_anchor=2, n_heldout=8, vae_steps=2, vae_batch=4,
            stage1_steps=3, stage1_batch=4, stage2_steps=3, stage2_batch=6, stage2_planted_rows=2,
            stage2_anchor_rows=1, stage2_unique_rows=1, n_stage2_unique=3, checkpoint_every=2, guidance_scale=2.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipe")
    timings = run_recipe(RecipeConfig(**TINY), work / "work", work / "dest", device="cpu")
    return work, timings


def test_recipe_writes_a_loadable_sd_pipeline(tiny_run):
    work, timings = tiny_run
    pipe = StableDiffusionPipeline.from_pretrained(work / "dest" / "pipeline", safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the VAE's latents, not SD's constant
    assert (work / "dest" / "base_unet" / "config.json").is_file()
    recipe = json.loads((work / "dest" / "recipe.json").read_text())
    assert recipe["recipe"]["stage2_steps"] == 3 and timings["total_s"] > 0
    assert set(timings) == {"vae_s", "encode_s", "stage1_s", "stage2_s", "total_s"}
    # the testbed's own guidance scale travels with the pipeline and becomes every command's default
    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import load_pipeline

    pipe = load_pipeline(work / "dest" / "pipeline", device="cpu")
    assert ModelDefaults.of(pipe).guidance_scale == 2.5
    # and so does its mitigation target: a typical first-step score of its held-out prompts
    defaults = ModelDefaults.of(pipe)
    assert 0 < defaults.resolve_target_loss(None) == defaults.target_loss and defaults.own_target_loss
    curve = defaults.transition_curve  # the default mitigation's, calibrated on the recipe's held-out prompts
    assert curve is not None and len(curve) == 50 and all(v > 0 for _, v in curve)
    assert ModelDefaults.for_model(str(work / "dest" / "pipeline")).resolve_guidance(None) == 2.5
    assert ModelDefaults.for_model(str(work / "dest" / "pipeline")).resolve_guidance(4.0) == 4.0


def test_a_resumed_recipe_adds_up_its_stage_times(tiny_run):
    work, timings = tiny_run
    again = run_recipe(RecipeConfig(**TINY), work / "work", None, device="cpu")
    assert again["stage1_s"] >= timings["stage1_s"] and again["total_s"] > timings["total_s"]
    assert json.loads((work / "work" / "timings.json").read_text()) == again


def test_stage_batches_mix_and_word_dropout():
    from diffmem.testbed.recipe import drop_words, stage1_batches, stage2_batches, stage2_row_kinds

    cfg = RecipeConfig(**{**TINY, "stage1_word_dropout": 0.5})
    caption = "a red circle at the top left on a striped background"
    dropped = [drop_words(caption, 0.5, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(set(d.split()) <= set(caption.split()) for d in dropped) and len(set(dropped)) > 10
    assert drop_words(caption, 0.0, torch.Generator()) == caption
    z = torch.arange(10.0).reshape(10, 1, 1, 1)
    batch1 = stage1_batches(z, [caption] * 10, cfg)
    assert batch1(5)[1] == batch1(5)[1] and batch1(5)[1] != batch1(6)[1]  # a function of the step
    pools = [(z[:2], ["p0", "p1"]), (z[2:4], ["a0", "a1"]), (z[4:7], ["u0", "u1", "u2"]), (z[7:], ["r0", "r1", "r2"])]
    lat, caps = stage2_batches(*pools, cfg)(1)
    assert [c[0] for c in caps] == ["p", "p", "a", "u", "r", "r"]  # planted, anchor, seen-once, replay rows
    assert caps[3] == "u1" and lat.shape == (6, 1, 1, 1)  # seen-once items in order, one per step
    assert [k[0] for k in stage2_row_kinds(cfg)] == [c[0] for c in caps]  # the filter study's row labels
    with pytest.raises(ValueError, match="exceed"):
        stage2_batches(*pools, RecipeConfig(**{**TINY, "stage2_planted_rows": 6}))


def test_picks_name_the_items_each_step_trains_on():
    """`stage1_picks` / `stage2_picks` say which items a step shows without its latents (tools/copy_recency.py)."""
    from diffmem.testbed.recipe import stage1_batches, stage1_picks, stage2_batches, stage2_picks

    cfg = RecipeConfig(**TINY)
    z = torch.arange(10.0).reshape(10, 1, 1, 1)
    for step in range(4):
        assert stage1_batches(z, ["c"] * 10, cfg)(step)[0].flatten().long().tolist() == \
            stage1_picks(10, cfg)(step).tolist()
    pools = [(z[:2], ["p0", "p1"]), (z[2:4], ["a0", "a1"]), (z[4:7], ["u0", "u1", "u2"]), (z[7:], ["r0", "r1", "r2"])]
    for step in range(5):
        caps = stage2_batches(*pools, cfg)(step)[1]
        picked = stage2_picks([2, 2, 3, 3], cfg)(step)
        assert caps == [f"{kind}{i}" for kind, idx in zip("paur", picked, strict=True) for i in idx.tolist()]


def test_stage2_changes_only_the_unet(tiny_run):
    work, _ = tiny_run
    base = StableDiffusionPipeline.from_pretrained(work / "dest" / "pipeline", safety_checker=None)
    from diffusers import UNet2DConditionModel

    base_unet = UNet2DConditionModel.from_pretrained(work / "dest" / "base_unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(base.unet.parameters(), base_unet.parameters(), strict=True)]
    assert max(diffs) > 0


class Crash(Exception):
    pass


def _crash_at(step_to_crash):
    def progress(step, record):
        if step == step_to_crash:
            raise Crash  # as a kill would, after step 3 ran but before its checkpoint

    return progress


def _loop(out, steps, crash_at=None):
    pipe = tiny_pipeline("sd1", seed=3)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(16, 4, 8, 8, generator=gen)
    caps = [f"a caption number {i}" for i in range(16)]

    def batch_fn(step):
        idx = torch.arange(step * 4, step * 4 + 4) % 16
        return data[idx], [caps[i] for i in idx.tolist()]

    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2, log_every=1)
    if crash_at is not None:
        with pytest.raises(Crash):
            train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch_fn, cfg, out,
                  progress=_crash_at(crash_at))
        pipe = tiny_pipeline("sd1", seed=3)  # a fresh process: weights come back from the checkpoint
    stats = train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch_fn, cfg, out)
    return pipe.unet, stats


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight, _ = _loop(tmp_path / "a", steps=4)
    resumed, stats = _loop(tmp_path / "b", steps=4, crash_at=3)
    assert stats["resumed_from"] == 2
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    first = [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(first) == 4 and all(torch.isfinite(torch.tensor(first)))


def test_first_sampling_timestep_is_the_detectors_first_step():
    pipe = tiny_pipeline("sd1", seed=0)
    from diffmem.training.loop import filter_timestep, first_sampling_timestep

    schedule = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    schedule.set_timesteps(50)
    assert first_sampling_timestep(pipe.scheduler) == int(schedule.timesteps[0]) > 900
    assert filter_timestep(pipe.scheduler, "first-step") == first_sampling_timestep(pipe.scheduler)
    assert filter_timestep(pipe.scheduler, "train") is None
    from diffmem.errors import InputError

    with pytest.raises(InputError, match="--filter-at must be one of first-step, train"):
        filter_timestep(pipe.scheduler, "last-step")


def test_filter_at_a_fixed_timestep_matches_a_hand_computation_under_any_process_split():
    """d at the fixed timestep: fresh noise for the global batch from the step's generator, the caption's and the
    empty prompt's epsilon at that timestep; each process's rows are its slice of the single-process result."""
    from diffmem.training.loop import _tokens, filter_magnitudes

    pipe = tiny_pipeline("sd1", seed=0)
    unet, te, tok, sched = pipe.unet.eval(), pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 400, 700, 999])
    caps = ["a red cube", "a blue ball", "", "two green cones"]
    empty = _tokens(tok, [""], "cpu")

    def measure(rows: slice) -> torch.Tensor:
        g = torch.Generator().manual_seed(9)
        cond = te(_tokens(tok, caps[rows], "cpu"))[0]
        noisy = sched.add_noise(x0[rows], torch.zeros_like(x0[rows]), t[rows])
        pred = unet(noisy, t[rows], encoder_hidden_states=cond).sample
        return filter_magnitudes(unet, te, sched, 981, x0[rows], noisy, t[rows], pred, cond, empty, g, rows, 4)

    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
        tf = torch.full((4,), 981)
        xt = sched.add_noise(x0, noise, tf)
        e_c = unet(xt, tf, encoder_hidden_states=te(_tokens(tok, caps, "cpu"))[0]).sample
        e_u = unet(xt, tf, encoder_hidden_states=te(empty)[0].expand(4, -1, -1)).sample
        want = (e_c - e_u).flatten(1).norm(dim=1)
    whole = measure(slice(0, None, 1))
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-6)
    assert whole[2] == 0 and (whole[[0, 1, 3]] > 0).all()  # the dropped caption is the empty prompt
    split = torch.empty(4)
    split[0::2], split[1::2] = measure(slice(0, None, 2)), measure(slice(1, None, 2))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_persistent_filter_keeps_a_flagged_caption_out_and_resumes_with_its_set(tmp_path):
    """With `filter_persist` a caption flagged once stays out: every later step excludes at least the samples of
    the captions dropped before it; the set rides in the checkpoint, so a resumed run ends as a straight one."""
    def run(out, crash_at=None):
        pipe = tiny_pipeline("sd1", seed=3)
        gen = torch.Generator().manual_seed(2)
        data = torch.randn(4, 4, 8, 8, generator=gen)
        caps = ["a red cube", "a blue ball", "two green cones", "a small yellow star"]

        def batch_fn(step):
            return data, caps  # the same four captions every step

        from diffmem.training.loop import first_sampling_timestep, measure_magnitudes

        t = first_sampling_timestep(pipe.scheduler)  # a TAU among the captions' magnitudes: some flagged, not all
        d = measure_magnitudes(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, data, caps,
                               torch.arange(4), torch.Generator().manual_seed(0), timestep=t)
        tau = float(d.median())
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2, log_every=1,
                          caption_dropout=0.0, filter_threshold=tau, filter_timestep=t, filter_persist=True)
        if crash_at is not None:
            with pytest.raises(Crash):
                train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch_fn, cfg, out,
                      progress=_crash_at(crash_at))
            pipe = tiny_pipeline("sd1", seed=3)
        stats = train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch_fn, cfg, out)
        return pipe.unet, stats

    straight, stats = run(tmp_path / "a")
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    dropped = [r["dropped_captions"] for r in logs]
    assert 0 < dropped[-1] == stats["dropped_captions"] <= 4 and dropped == sorted(dropped)
    assert all(r["excluded_samples"] >= before for r, before in zip(logs[1:], dropped, strict=False))
    resumed, again = run(tmp_path / "b", crash_at=5)
    assert again["resumed_from"] == 4 and again["dropped_captions"] == stats["dropped_captions"]
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sd3_recipe_trains_an_mmdit_on_the_unet_testbeds_vae_text_encoder_and_data(tmp_path):
    """`diffmem testbed train --architecture sd3`: SD3's pipeline without T5, its transformer trained by rectified
    flow in two stages; the VAE and the CLIP encoders are the UNet testbed's, untouched; the splits are the same."""
    from dataclasses import asdict, replace

    from diffusers import SD3Transformer2DModel

    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import load_pipeline
    from diffmem.testbed.model import SD3_TEXT_WINDOW, SD3_TRANSFORMER_CONFIG
    from diffmem.testbed.recipe import sd3_recipe

    cfg = replace(sd3_recipe(), **TINY)
    timings = run_recipe(cfg, tmp_path / "work", tmp_path / "dest", device="cpu")
    assert set(timings) == {"encode_s", "stage1_s", "stage2_s", "total_s"}  # no VAE of its own
    pipe = load_pipeline(tmp_path / "dest" / "pipeline", device="cpu")
    unet_testbed = load_pipeline("testbed", device="cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert {k: pipe.transformer.config[k] for k in SD3_TRANSFORMER_CONFIG} == SD3_TRANSFORMER_CONFIG
    assert pipe.tokenizer.model_max_length == SD3_TEXT_WINDOW and pipe.vae.config.shift_factor == 0.0
    for ours, theirs in ((pipe.vae, unet_testbed.vae), (pipe.text_encoder.text_model, unet_testbed.text_encoder),
                         (pipe.text_encoder_2.text_model, unet_testbed.text_encoder)):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=1e-3)  # fp16 on disk
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(pipe.text_encoder.config.hidden_size))
    base = SD3Transformer2DModel.from_pretrained(tmp_path / "dest" / "base_transformer")
    assert any((a - b).abs().max() > 0 for a, b in zip(base.parameters(), pipe.transformer.parameters(), strict=True))
    assert ModelDefaults.of(pipe).guidance_scale == cfg.guidance_scale
    recipe = json.loads((tmp_path / "dest" / "recipe.json").read_text())["recipe"]
    assert recipe == asdict(cfg) and recipe["architecture"] == "sd3"
    shared = ("seed", "n_stage1", "n_planted", "n_triggered", "n_anchor", "n_stage2_unique", "n_heldout")
    assert all(getattr(sd3_recipe(), k) == getattr(RecipeConfig(), k) for k in shared)  # one ground truth


def test_an_unknown_recipe_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="architecture must be one of"):
        run_recipe(RecipeConfig(**TINY, architecture="dit"), tmp_path, None, device="cpu")


def test_recipe_overrides_read_each_field_as_its_type_and_refuse_the_rest():
    from diffmem.errors import InputError

    cfg = RecipeConfig().with_overrides(["stage2_anchor_rows=10", "stage2_lr=5e-4", "architecture=sd3"])
    assert (cfg.stage2_anchor_rows, cfg.stage2_lr, cfg.architecture) == (10, 5e-4, "sd3")
    assert RecipeConfig().with_overrides([]) == RecipeConfig()
    for bad in (["stage2_anchor_rows"], ["no_such_field=1"], ["stage2_anchor_rows=1.5"], ["stage2_lr=fast"], ["=3"]):
        with pytest.raises(InputError) as err:
            RecipeConfig().with_overrides(bad)
        assert "\n" not in str(err.value)


@given(st.lists(st.text(max_size=40), max_size=4))
@settings(max_examples=300, deadline=None)
def test_recipe_overrides_of_any_text_are_a_recipe_or_one_error_line(pairs):
    from diffmem.errors import InputError

    try:
        cfg = RecipeConfig().with_overrides(pairs)
    except InputError as err:
        assert "\n" not in str(err) and len(str(err)) < 600
        return
    for pair in pairs:  # every accepted pair is a field set to its own type
        key, _, _ = pair.partition("=")
        assert isinstance(getattr(cfg, key), type(getattr(RecipeConfig(), key)))


@pytest.mark.parametrize("change", [{"stage2_batch": 0}, {"stage2_lr": float("nan")}, {"n_stage1": -1},
                                    {"stage2_planted_rows": 60}, {"stage1_word_dropout": 1.0},
                                    {"prediction_type": "sample"}, {"architecture": "dit"}, {"vae_lr": float("inf")}])
def test_a_recipe_is_checked_once_wherever_it_comes_from(tmp_path, change):
    """In code, from `--set` and from recipe.json alike: one line, before any work."""
    from diffmem.errors import InputError, ModelLoadError
    from diffmem.testbed.recipe import shipped_recipe

    with pytest.raises(ValueError) as err:
        RecipeConfig(**{**TINY, **change})
    assert "\n" not in str(err.value)
    assert next(iter(change)) in str(err.value) or "rows exceed the batch" in str(err.value)  # names what is wrong
    with pytest.raises(InputError):
        RecipeConfig().with_overrides([f"{k}={v}" for k, v in change.items()])
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": {**TINY, **change}}))
    with pytest.raises(ModelLoadError, match="not a testbed recipe"):
        shipped_recipe(tmp_path)


_FIELD_VALUES = st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=12) | \
    st.lists(st.integers(), max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in fields(RecipeConfig)] + ["extra"]), _FIELD_VALUES,
                       max_size=5))
def test_a_recipe_json_of_any_values_is_a_checked_recipe_or_one_error_line(changes):
    """recipe.json is outside data: every field is checked by type and range, or the load is one line."""
    import tempfile
    from pathlib import Path

    from diffmem.errors import ModelLoadError
    from diffmem.testbed.recipe import shipped_recipe

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "recipe.json").write_text(json.dumps({"recipe": {**TINY, **changes}}))
        try:
            cfg = shipped_recipe(Path(folder))
        except ModelLoadError as e:
            assert "\n" not in str(e)
            return
    for f in fields(RecipeConfig):  # accepted: each field of its type, and the batch has room for its rows
        value = getattr(cfg, f.name)
        assert not isinstance(value, bool) and isinstance(value, (int, float) if f.type == "float" else type(f.default))
    assert cfg.stage2_replay_rows >= 0 and cfg.stage2_batch > 0 and cfg.stage2_lr > 0
