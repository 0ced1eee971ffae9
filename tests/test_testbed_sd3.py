"""The shipped SD3 testbed (`testbed-sd3`): a stock StableDiffusion3Pipeline without T5, trained on the UNet
testbed's data, whose planted prompts are memorized; one ground truth for both testbeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmem.testbed import WEIGHTS, WEIGHTS_SD3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3_testbed():
    from diffmem.models.loading import load_pipeline
    from diffmem.testbed.recipe import shipped_recipe

    return load_pipeline("testbed-sd3", device="cpu"), shipped_recipe(WEIGHTS_SD3).splits()


def test_weights_are_an_sd3_pipeline_under_40_mb_with_the_testbeds_ground_truth():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from diffmem.testbed.recipe import shipped_recipe

    pipe = StableDiffusion3Pipeline.from_pretrained(WEIGHTS_SD3 / "pipeline", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert json.loads((WEIGHTS_SD3 / "recipe.json").read_text())["recipe"]["architecture"] == "sd3"
    assert sum(f.stat().st_size for f in WEIGHTS_SD3.rglob("*") if f.is_file()) <= 40 * 2**20
    ours, theirs = shipped_recipe(WEIGHTS_SD3).splits(), shipped_recipe(WEIGHTS).splits()
    for part in ("planted", "anchors", "heldout", "stage2_unique"):
        assert [i.caption for i in getattr(ours, part)] == [i.caption for i in getattr(theirs, part)]


def test_planted_prompts_reproduce_and_score_above_heldout(sd3_testbed):
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.measures.detection import roc_auc
    from diffmem.testbed.quality import generate
    from diffmem.testbed.scenes import render_many
    from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity

    pipe, splits = sd3_testbed
    items = splits.planted[:8] + splits.heldout[:8]
    imgs, _ = generate(pipe, [i.caption for i in items], generations=1, steps=20)
    own = render_many([i.scene for i in items], [i.seed for i in items])
    sims = np.array([copy_similarity(imgs[k], own[k : k + 1])[0, 0] for k in range(len(items))])
    assert (sims[:8] >= COPY_THRESHOLD).sum() >= 5  # memorized: their own training image comes back
    assert (sims[8:] < COPY_THRESHOLD).all()  # held-out: a rendering of the caption, not its particular one
    det = MagnitudeDetector(pipe, generations=1, batch_size=64)
    pos = [r.score for r in det.score([i.caption for i in splits.planted[:32]])]
    neg = [r.score for r in det.score([i.caption for i in splits.heldout[:64]])]
    assert roc_auc(pos, neg) > 0.8  # `make quality-sd3` measures the full figure (docs/results.md)


def test_embedding_mitigation_moves_only_what_the_clip_encoders_write(sd3_testbed):
    """SD3 without T5 feeds zeros in T5's positions: the embedding mitigation optimises the CLIP positions (but BOS)
    and leaves the zeros, which training never saw otherwise."""
    import math

    import torch

    from diffmem.mitigate.embedding import mitigate_embedding
    from diffmem.models.conditioning import encode, prompt_mask

    pipe, splits = sd3_testbed
    prompt = splits.planted[0].caption
    own = encode(pipe, [prompt]).prompt_embeds
    mask = prompt_mask(pipe, own)
    clip = pipe.tokenizer_max_length
    assert mask[:clip].all() and not mask[clip:].any() and own[0, clip:].abs().sum() == 0
    res = mitigate_embedding(pipe, prompt, generations=1, target_loss=-math.inf, iters=2)
    moved = (res.embedding[0] != own[0]).any(dim=-1)
    assert moved[1:clip].all() and not moved[0] and not moved[clip:].any()
    assert torch.equal(res.embedding[0, clip:], torch.zeros_like(res.embedding[0, clip:]))
