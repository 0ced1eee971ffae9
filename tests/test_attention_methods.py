"""Cross-attention methods against hand-written references: Ren et al.'s LE and AE, Bright Ending, Ren et al.'s
re-scaling, and the processors that carry them (restored after every call, also after an exception)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmem.detectors import AttentionEntropyDetector, BrightEndingDetector, LayerEntropyDetector
from diffmem.detectors.base import initial_noise
from diffmem.errors import InputError
from diffmem.mitigate import generate
from diffmem.mitigate.attention_rescale import AttentionRescale
from diffmem.models.attention import AttentionHook, cross_attention, cross_attention_names, entropy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
STEPS = 5


def _eps(scheduler, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v-prediction to epsilon with the scheduler's own tables (DDIM: sqrt(abar), sqrt(1 - abar))."""
    if scheduler.config.prediction_type != "v_prediction":
        return pred
    abar = float(scheduler.alphas_cumprod[int(t)])
    return abar**0.5 * pred + (1 - abar) ** 0.5 * x


class Probe:
    """Hand-computed cross-attention probabilities of every cross-attention module, from its inputs (a forward
    pre-hook on each `attn2`), independent of diffmem's processors: softmax(scale * q k^T) per head."""

    def __init__(self, unet) -> None:
        self.unet, self.maps, self.handles = unet, [], []
        names = [n.removesuffix(".processor") for n in cross_attention_names(unet)]
        self.modules = [unet.get_submodule(n) for n in names]
        self.names = names

    def __enter__(self) -> Probe:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._hook(i, module), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int, module):
        def hook(_m, args, kwargs):
            x, ctx = args[0], kwargs["encoder_hidden_states"]
            q, k = module.to_q(x), module.to_k(ctx)
            b, heads = q.shape[0], module.heads
            q = q.reshape(b, q.shape[1], heads, -1).transpose(1, 2).double()
            k = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2).double()
            probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1)
            self.maps.append((i, probs))  # (batch, heads, queries, tokens)
        return hook


def _cfg_loop(pipe, prompt: str, latent: torch.Tensor, steps: int, guidance: float = 7.5):
    """A plain CFG loop (two unbatched UNet calls per step) recording per step: the conditional call's attention
    maps (layer -> probs) and eps_c - eps_u."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x, records = latent.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            with Probe(pipe.unet) as probe:
                pred_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
            pred_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            diff = _eps(scheduler, pred_c, x, t) - _eps(scheduler, pred_u, x, t)
            records.append((dict(probe.maps), diff, probe.names))
            x = scheduler.step(pred_u + guidance * (pred_c - pred_u), t, x).prev_sample
    return records


def _eos(pipe, prompt: str) -> int:
    return len(pipe.tokenizer(prompt).input_ids) - 1


def test_layer_entropy_is_the_entropy_of_the_head_and_position_mean(pipe, reference) -> None:
    results = LayerEntropyDetector(pipe, generations=2, seed=1, layer=1).score(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        hand = []
        for g in range(2):
            maps = _cfg_loop(pipe, prompt, reference.noise(1 + g), 1)[0][0]
            p = maps[1][0].mean(dim=(0, 1))
            hand.append(float(-(p * p.log()).sum()))
        assert res.terms == pytest.approx(hand, rel=1e-4)
        assert res.score == pytest.approx(sum(hand) / 2, rel=1e-4)
        first = [reference.magnitudes(pipe, prompt, reference.noise(1 + g), 1)[0] for g in range(2)]
        assert [m[0] for m in res.magnitudes] == pytest.approx(first, rel=1e-4)


def test_attention_entropy_adds_the_summary_token_term(pipe, reference) -> None:
    det = AttentionEntropyDetector(pipe, generations=1, seed=2, num_inference_steps=STEPS, last_steps=2)
    for prompt, res in zip(PROMPTS, det.score(PROMPTS), strict=True):
        records = _cfg_loop(pipe, prompt, reference.noise(2), STEPS)
        means = [torch.stack([probs[0].mean(dim=(0, 1)) for probs in maps.values()]).mean(dim=0)
                 for maps, _, _ in records]
        eos = _eos(pipe, prompt)

        def h(p: torch.Tensor) -> float:
            return float(-(p * p.log()).sum())

        late = np.mean([h(means[s]) for s in (3, 4)])
        summary = np.mean([h(means[s][eos:]) for s in (3, 4)]) - h(means[0][eos:])
        assert res.terms == [pytest.approx(late + summary, rel=1e-4)]
        assert res.magnitudes[0] == pytest.approx([float(d.norm()) for _, d, _ in records], rel=1e-4)


def test_bright_ending_masks_every_step_by_the_final_end_token_map(pipe, reference) -> None:
    det = BrightEndingDetector(pipe, generations=1, seed=4, num_inference_steps=STEPS)
    for prompt, res in zip(PROMPTS, det.score(PROMPTS), strict=True):
        records = _cfg_loop(pipe, prompt, reference.noise(4), STEPS)
        maps, _, names = records[-1]
        down = [i for i in maps if names[i].startswith("down_blocks")]
        finest = max(maps[i].shape[2] for i in down)
        mask = torch.stack([maps[i][0, :, :, _eos(pipe, prompt)].mean(dim=0) for i in down
                            if maps[i].shape[2] == finest]).mean(dim=0).reshape(1, 1, 8, 8)
        hand = np.mean([float((d.double() * mask).norm() / mask.mean()) for _, d, _ in records])
        assert res.terms == [pytest.approx(hand, rel=1e-4)]
        assert res.timesteps == sorted(res.timesteps, reverse=True) and len(res.timesteps) == STEPS


def test_processors_are_restored_after_every_call_and_after_an_exception(sd1_pipe) -> None:
    before = dict(sd1_pipe.unet.attn_processors)
    LayerEntropyDetector(sd1_pipe).score(PROMPTS[:1])
    AttentionEntropyDetector(sd1_pipe, num_inference_steps=3).score(PROMPTS[:1])
    generate(sd1_pipe, PROMPTS[:1], "attention", num_inference_steps=2)

    class Boom(Exception):
        pass

    class Explode(AttentionHook):
        def observe(self, layer: int, probs: torch.Tensor) -> None:
            raise Boom

    with pytest.raises(Boom), cross_attention(sd1_pipe.unet, Explode()):
        sd1_pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    after = sd1_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not sd1_pipe.unet._forward_pre_hooks
    with pytest.raises(InputError, match="layer 99"), cross_attention(sd1_pipe.unet, AttentionHook(), layers=[99]):
        pass
    assert all(sd1_pipe.unet.attn_processors[k] is before[k] for k in before)


def test_a_hook_that_changes_nothing_gives_the_default_output(pipe) -> None:
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    cond, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=cond).sample
        with cross_attention(pipe.unet, AttentionHook()):
            hooked = pipe.unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)


def test_rescaling_masks_the_padding_and_scales_the_conditional_beginning_token(sd1_pipe) -> None:
    attn = sd1_pipe.unet.get_submodule(cross_attention_names(sd1_pipe.unet)[0].removesuffix(".processor"))
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, attn.query_dim, generator=gen), torch.randn(2, 77, 32, generator=gen)
    eos, c1 = 5, 1.25
    heads = attn.heads
    q = attn.to_q(x).reshape(2, 16, heads, -1).transpose(1, 2)
    k = attn.to_k(ctx).reshape(2, 77, heads, -1).transpose(1, 2)
    v = attn.to_v(ctx).reshape(2, 77, heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    logits[..., eos + 1 :] = -math.inf
    logits[1, :, :, 0] *= c1  # row 1: the conditional half of a two-row CFG batch
    hand = attn.to_out[0]((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, -1))
    with torch.no_grad(), cross_attention(sd1_pipe.unet, AttentionRescale(eos, c1)):
        got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, hand.detach(), rtol=1e-4, atol=1e-5)


def test_attention_mitigation_changes_the_image_and_is_seeded(sd1_pipe) -> None:
    settings = dict(generations=2, num_inference_steps=3)
    out = generate(sd1_pipe, PROMPTS[:1], "attention", **settings)
    again = generate(sd1_pipe, PROMPTS[:1], "attention", **settings)
    plain = sd1_pipe(PROMPTS[0], num_images_per_prompt=2, latents=initial_noise(sd1_pipe, 2, 0),
                     num_inference_steps=3, output_type="np").images
    assert np.array_equal(out.images[0], again.images[0]) and not np.array_equal(out.images[0], plain)
    d = out.decisions[0]
    assert d.mitigated and d.details == {"c1": 1.25} and d.final_loss != d.score
    with pytest.raises(InputError, match="sail_threshold"):
        generate(sd1_pipe, PROMPTS[:1], "attention", method_options={"sail_threshold": 1.0})


def test_entropy_is_zero_for_a_point_mass() -> None:
    assert float(entropy(torch.tensor([0.0, 1.0, 0.0]))) == 0.0
    assert float(entropy(torch.full((4,), 0.25))) == pytest.approx(math.log(4))
