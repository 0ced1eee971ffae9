"""The flow and DiT models (SD3, PixArt-Sigma, Flux): loading, the score in the parameterization that carries the
prompt, detection and the monitor, each on a tiny random pipeline saved and loaded as a user would, checked
against the pipeline's own CFG branches read by a hook on its denoiser during a plain call."""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.attention_entropy import AttentionEntropyDetector, LayerEntropyDetector
from diffmem.detectors.bright_ending import BrightEndingDetector
from diffmem.detectors.carlini import CarliniDetector
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.monitor import Monitor
from diffmem.detectors.nemo import NemoDetector
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.detectors.step_norm import StepNormDetector
from diffmem.errors import InputError, ModelLoadError, UnsupportedModelError
from diffmem.explanation.attribution import explain
from diffmem.io.results import read_results
from diffmem.mitigate.embedding import mitigate_embedding
from diffmem.mitigate.guard import generate, guarded_generate
from diffmem.models import loading
from diffmem.models.conditioning import empty, encode, prompt_positions, text_window
from diffmem.models.defaults import DISTILLED_GUIDANCE, FAMILY_GUIDANCE, ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise
from diffmem.models.families import network
from diffmem.models.loading import load_pipeline
from diffmem.testbed.model import build_tokenizer
from diffmem.testbed.tiny import TINY_TEXT

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' DPM-Solver hands numpy a tensor without the `copy` keyword numpy 2 expects
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

KINDS = ("sd3", "pixart", "flux")
PROMPTS = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
WORDS = ["a", "an", "the", "red", "blue", "cube", "table", "wooden", "portrait", "of", "smiling", "old", "man", "oil",
         "painting", "on", "in", "cat", "dog", "photo"]
STEPS = 3
REL = 1e-4
FLUX_SAMPLE_SIZE = 8
"""Flux's pipeline fixes its default image side at 128 latent pixels (`default_sample_size`); the tiny one is
set to 8 after loading, the pipeline's own attribute, so its calls and diffmem's noise are 16x16-pixel images."""
FLUX_TRUE_CFG = 2.0
"""The true-CFG scale of the Flux calls that guide (the family default, 1, runs no unconditional branch)."""


# ------------------------------------------------------------------------------------------ tiny models


def t5_tokenizer() -> T5TokenizerFast:
    """An offline T5 tokenizer: a Unigram vocabulary of whole words (pad 0, EOS 1, unk 2), T5's EOS template."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_encoder(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 4, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8))


def clip(seed: int, projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**TINY_TEXT, hidden_act="gelu"))


def vae(seed: int) -> AutoencoderKL:
    """A two-level VAE (scale factor 2): 16x16 pixels are 8x8 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, shift_factor=0.0)  # SD3 and Flux decode with one


def tiny_sd3() -> StableDiffusion3Pipeline:
    """SD3: MMDiT over 2x2 patches, two CLIP encoders with projections and T5, rectified flow with shift 3."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae(1), text_encoder=clip(2), tokenizer=build_tokenizer(),
                                    text_encoder_2=clip(3), tokenizer_2=build_tokenizer(),
                                    text_encoder_3=t5_encoder(4), tokenizer_3=t5_tokenizer())


def tiny_pixart() -> PixArtSigmaPipeline:
    """PixArt-Sigma: DiT with cross-attention to T5 (and its mask), epsilon with learned variance, DPM-Solver."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8,
                                           num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                           cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
                                           num_embeds_ada_norm=1000, use_additional_conditions=False)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(4), vae=vae(1),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def tiny_flux() -> FluxPipeline:
    """Flux.1-dev: MMDiT on packed latents with rotary position ids, CLIP pooled + T5, guidance embedding,
    rectified flow with the resolution-dependent shift."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 2, 2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae(1), text_encoder=clip(2, projection=False),
                        tokenizer=build_tokenizer(), text_encoder_2=t5_encoder(4), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


BUILDERS: dict[str, Callable[[], Any]] = {"sd3": tiny_sd3, "pixart": tiny_pixart, "flux": tiny_flux}


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny pipeline saved as a diffusers folder."""
    from diffmem.models.loading import quiet_diffusers

    quiet_diffusers()
    root = tmp_path_factory.mktemp("flow-models")
    for kind, build in BUILDERS.items():
        build().save_pretrained(root / kind)
    return {kind: root / kind for kind in KINDS}


def _load(folder: Path, kind: str) -> Any:
    pipe = load_pipeline(folder, device="cpu")
    if kind == "flux":
        pipe.default_sample_size = FLUX_SAMPLE_SIZE
    return pipe


@pytest.fixture(scope="module")
def flow_pipes(flow_dirs: dict[str, Path]) -> dict[str, Any]:
    return {kind: _load(folder, kind) for kind, folder in flow_dirs.items()}


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ------------------------------------------------------------------------------------------- reference


def _guidance(pipe: Any, kind: str) -> float:
    """The CFG scale the all-steps checks sample with: the family's, or for Flux a true-CFG scale above 1."""
    return FLUX_TRUE_CFG if kind == "flux" else ModelDefaults.of(pipe).guidance_scale


def _call(pipe: Any, kind: str, prompts: list[str], latents: torch.Tensor, guidance: float, steps: int = STEPS,
          **extra: Any) -> torch.Tensor:
    """A plain pipeline call from `latents`, with the family's way of guiding against "" (the latents out)."""
    kwargs: dict[str, Any] = dict(prompt=prompts, latents=latents, num_inference_steps=steps, output_type="latent")
    if kind == "flux":
        kwargs.update(negative_prompt=[""] * len(prompts), true_cfg_scale=guidance)
    else:
        kwargs.update(guidance_scale=guidance)
    if kind == "pixart":
        kwargs.update(use_resolution_binning=False)
    return pipe(**{**kwargs, **extra}).images


@torch.no_grad()
def branches(pipe: Any, kind: str, prompt: str, latents: torch.Tensor, guidance: float,
             steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """`(pred_c, pred_u, x_t, t)` of each step of a plain call, read by a forward hook on the denoiser: SD3 and
    PixArt batch [uncond; cond] (PixArt: the epsilon half of its output), Flux calls the prompt's branch and
    then the negative prompt's. `t` is the scheduler's timestep."""
    calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        t = float(kwargs["timestep"].reshape(-1)[0]) * (1000 if kind == "flux" else 1)
        calls.append((output[0].clone(), x.clone(), t))

    handle = network(pipe).register_forward_hook(hook, with_kwargs=True)
    try:
        _call(pipe, kind, [prompt], latents, guidance, steps)
    finally:
        handle.remove()
    if kind == "flux":
        return [(c, u, x, t) for (c, x, t), (u, _, _) in zip(calls[::2], calls[1::2], strict=True)]
    out = []
    for pred, x, t in calls:
        pred = pred[:, :4] if kind == "pixart" else pred
        uncond, cond = pred.chunk(2)
        out.append((cond, uncond, x.chunk(2)[0], t))
    return out


def reference(pipe: Any, kind: str, prompt: str, latents: torch.Tensor, guidance: float,
              steps: int = STEPS) -> list[float]:
    """`d_t` by hand: `||v_c - v_u||` for the flow models, `||eps_c - eps_u||` for PixArt."""
    return [float((c - u).double().norm()) for c, u, _, _ in branches(pipe, kind, prompt, latents, guidance, steps)]


# ------------------------------------------------------------------------------------------------ tests


def test_family_defaults_are_diffusers_call_defaults(flow_pipes: dict[str, Any]) -> None:
    """Each family's guidance is its pipeline's own `__call__` default (Flux: true CFG; its distilled value)."""
    for cls, argument in ((StableDiffusion3Pipeline, "guidance_scale"), (PixArtSigmaPipeline, "guidance_scale"),
                          (FluxPipeline, "true_cfg_scale")):
        assert FAMILY_GUIDANCE[cls.__name__] == inspect.signature(cls.__call__).parameters[argument].default
    assert DISTILLED_GUIDANCE["FluxPipeline"] == inspect.signature(FluxPipeline.__call__).parameters[
        "guidance_scale"].default
    found = {kind: ModelDefaults.of(pipe) for kind, pipe in flow_pipes.items()}
    assert [(d.guidance_scale, d.prediction_type) for d in found.values()] == [
        (7.0, "flow"), (4.5, "epsilon"), (1.0, "flow")]
    assert found["sd3"].resolution == 16 and found["flux"].distilled_guidance == 3.5
    assert found["sd3"].distilled_guidance is None


def test_loads_and_encodes_as_the_pipeline_does(flow_pipes: dict[str, Any], kind: str) -> None:
    pipe = flow_pipes[kind]
    cond, blank = encode(pipe, PROMPTS[:1]), empty(pipe)
    if kind == "sd3":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[0], None, None, device="cpu")
        assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_embeds, pooled)
        assert torch.equal(blank.prompt_embeds, neg) and torch.equal(blank.pooled_embeds, neg_pooled)
    elif kind == "pixart":
        embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS[0], device="cpu", clean_caption=False)
        assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.attention_mask, mask)
        assert torch.equal(blank.prompt_embeds, neg) and torch.equal(blank.attention_mask, neg_mask)
        assert cond.prompt_embeds.shape[1] == 300  # PixArt-Sigma's max_sequence_length
    else:
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS[0], None, device="cpu")
        neg, neg_pooled, _ = pipe.encode_prompt("", None, device="cpu")
        assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_embeds, pooled)
        assert torch.equal(blank.prompt_embeds, neg) and torch.equal(blank.pooled_embeds, neg_pooled)


@pytest.mark.parametrize("steps", ["first", "all"])
def test_detection_matches_the_pipelines_own_branches(flow_pipes: dict[str, Any], kind: str, steps: str) -> None:
    pipe = flow_pipes[kind]
    guidance = _guidance(pipe, kind)
    detector = MagnitudeDetector(pipe, steps=steps, generations=2, seed=3, num_inference_steps=STEPS,
                                 guidance_scale=guidance if kind == "flux" else None)
    results = detector.score(PROMPTS)
    noise = initial_noise(pipe, 2, 3)
    n_steps = 1 if steps == "first" else STEPS
    for prompt, result in zip(PROMPTS, results, strict=True):
        for g in range(2):
            want = reference(pipe, kind, prompt, noise[g : g + 1], guidance)[:n_steps]
            assert result.magnitudes[g] == pytest.approx(want, rel=REL)
        assert result.score == pytest.approx(sum(map(sum, result.magnitudes)) / (2 * n_steps), rel=1e-9)
    assert results[0].timesteps[0] == (1000.0 if kind != "pixart" else 999.0)


def test_flux_default_scores_without_true_cfg(flow_pipes: dict[str, Any]) -> None:
    """Flux's default guidance (true CFG off) scores the first step like any other scale, and its later steps
    follow the distilled model's own trajectory (the prompt's branch alone)."""
    pipe = flow_pipes["flux"]
    first = MagnitudeDetector(pipe, generations=2).score(PROMPTS)
    guided = MagnitudeDetector(pipe, generations=2, guidance_scale=FLUX_TRUE_CFG).score(PROMPTS)
    assert [r.score for r in first] == pytest.approx([r.score for r in guided], rel=1e-6)
    plain = MagnitudeDetector(pipe, steps="all", num_inference_steps=STEPS).score(PROMPTS[:1])[0]
    captured: list[torch.Tensor] = []
    handle = network(pipe).register_forward_hook(lambda m, a, k, o: captured.append(k["hidden_states"].clone()),
                                                 with_kwargs=True)
    try:
        pipe(PROMPTS[0], latents=initial_noise(pipe, 1, 0), num_inference_steps=STEPS, output_type="latent")
    finally:
        handle.remove()
    denoiser, param = Denoiser(pipe), Parameterization.of(Denoiser(pipe).schedule(STEPS))
    scheduler = denoiser.schedule(STEPS)
    with torch.no_grad():  # d_t on the latents the plain (unguided) call visited
        want = []
        for x, t in zip(captured, scheduler.timesteps, strict=True):
            c, u = denoiser.cfg(x, t, encode(pipe, PROMPTS[:1]), denoiser.empty())
            want.append(float((param.to_score(c, x, t) - param.to_score(u, x, t)).norm()))
    assert plain.magnitudes[0] == pytest.approx(want, rel=REL)


def test_flow_first_step_score_is_the_predicted_x0_difference(flow_pipes: dict[str, Any]) -> None:
    """At s = 1 the noise prediction is the input for every prompt; the score is the x0 difference."""
    for kind in ("sd3", "flux"):
        pipe = flow_pipes[kind]
        score = MagnitudeDetector(pipe, seed=5).score(PROMPTS[:1])[0].score
        c, u, x, t = branches(pipe, kind, PROMPTS[0], initial_noise(pipe, 1, 5), _guidance(pipe, kind), 1)[0]
        assert t == 1000.0
        param = Parameterization.of(pipe.scheduler)
        x0_c, x0_u = param.to_x0(c, x, t), param.to_x0(u, x, t)
        assert float((x0_c - x0_u).norm()) == pytest.approx(score, rel=REL)
        assert torch.equal(param.to_epsilon(c, x, t), param.to_epsilon(u, x, t))  # eps = x_T: no prompt in it


@pytest.mark.parametrize("s", [1.0, 0.6, 0.05])
def test_flow_parameterization_round_trips(s: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler()
    param = Parameterization.of(scheduler)
    assert param.kind == "flow" and param.score_space == "velocity"
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    t = torch.tensor(s * scheduler.config.num_train_timesteps)
    x_t, v = (1 - s) * x0 + s * eps, eps - x0
    assert torch.allclose(param.to_x0(v, x_t, t), x0, atol=1e-5)
    assert torch.allclose(param.to_epsilon(v, x_t, t), eps, atol=1e-5)
    assert torch.equal(param.to_score(v, x_t, t), v)
    if s == 1.0:
        with pytest.raises(ValueError, match="s = 1"):
            param.from_epsilon(eps, x_t, t)
    else:
        assert torch.allclose(param.from_epsilon(eps, x_t, t), v, atol=1e-4)


def test_monitor_is_bit_identical_and_reads_the_branches(flow_pipes: dict[str, Any], kind: str) -> None:
    pipe = flow_pipes[kind]
    guidance = _guidance(pipe, kind)
    latents = initial_noise(pipe, 2, 7)
    plain = _call(pipe, kind, PROMPTS, latents, guidance)
    with Monitor(pipe) as monitor:
        watched = _call(pipe, kind, PROMPTS, latents, guidance)
    assert torch.equal(plain, watched)
    assert not monitor.attached and network(pipe)._forward_hooks == {}
    mags = monitor.magnitudes()
    assert mags.shape == (2, STEPS)
    for row, prompt in enumerate(PROMPTS):
        assert mags[row].tolist() == pytest.approx(reference(pipe, kind, prompt, latents[row : row + 1], guidance),
                                                   rel=REL)
    assert monitor.timesteps()[0] == (999.0 if kind == "pixart" else 1000.0)
    assert monitor.update_norms().shape == (2, STEPS - 1)


def test_monitor_on_flux_without_true_cfg_records_nothing(flow_pipes: dict[str, Any]) -> None:
    pipe = flow_pipes["flux"]
    latents = initial_noise(pipe, 1, 0)
    with Monitor(pipe) as monitor:
        pipe(PROMPTS[0], latents=latents, num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(InputError, match="true_cfg_scale"):
        monitor.magnitudes()
    assert monitor.unguided_calls == STEPS - 1  # the last call's pairing is still open when the call ends


def test_token_window_is_the_t5_sequence(flow_pipes: dict[str, Any]) -> None:
    pipe = flow_pipes["pixart"]
    tokenizer, limit = text_window(pipe)
    assert tokenizer is pipe.tokenizer and limit == 299  # max_sequence_length 300 less EOS
    long = " ".join(["cat"] * 300) + " dog photo"
    short, cut = MagnitudeDetector(pipe).score(["a cat", long])
    assert (short.n_tokens, short.truncated) == (2, False)
    assert (cut.n_tokens, cut.truncated) == (302, True) and cut.truncated_text.split() == ["cat", "dog", "photo"]
    assert text_window(flow_pipes["flux"])[1] == 511 and text_window(flow_pipes["sd3"])[1] == 255


@pytest.mark.parametrize("detector", [LayerEntropyDetector, AttentionEntropyDetector, BrightEndingDetector,
                                      NemoDetector])
def test_cross_attention_peers_refuse_joint_attention(flow_pipes: dict[str, Any], detector: Any) -> None:
    for kind in ("sd3", "flux"):
        with pytest.raises(InputError) as info:
            detector(flow_pipes[kind], generations=max(2, detector.min_generations))
        message = str(info.value)
        assert "joint attention has no cross-attention map" in message and "\n" not in message
        assert detector.unsupported(flow_pipes[kind]) == message
    assert detector.unsupported(flow_pipes["pixart"]) is not None


def test_detect_command_refuses_a_cross_attention_peer(flow_dirs: dict[str, Path], tmp_path: Path,
                                                       cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = cli("detect", "--model", flow_dirs["sd3"], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                 "--detector", "ren-le")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "joint attention has no cross-attention map" in lines[0], lines


def _flat(rows: list[list[float | None]]) -> list[float | None]:
    return [v for row in rows for v in row]


def test_anisotropy_reads_the_velocity_then_the_noise_direction(flow_pipes: dict[str, Any], kind: str) -> None:
    """Its first term is Wen's score (a flow model's velocity difference), its cosine the epsilon-space one at the
    low-noise step (s < 1), by hand; a schedule whose cosine step is a flow model's first is refused."""
    pipe, n_steps = flow_pipes[kind], 5
    results = AnisotropyDetector(pipe, generations=2, seed=1, num_inference_steps=n_steps).score(PROMPTS)
    wen = MagnitudeDetector(pipe, generations=2, seed=1, num_inference_steps=n_steps).score(PROMPTS)
    denoiser = Denoiser(pipe)
    scheduler = denoiser.schedule(n_steps)
    param, t_low = Parameterization.of(scheduler), scheduler.timesteps[-3]
    x = denoiser.first_input(initial_noise(pipe, 2, 1), scheduler)
    for prompt, result, reference_row in zip(PROMPTS, results, wen, strict=True):
        assert _flat(result.magnitudes) == pytest.approx(_flat(reference_row.magnitudes), rel=REL)
        with torch.no_grad():
            c, u = denoiser.cfg(x, t_low, encode(pipe, [prompt]).expand(2), denoiser.empty().expand(2))
        eps_c, eps_u = (denoiser.unpacked(param.to_epsilon(pred, x, t_low)) for pred in (c, u))
        cos = torch.nn.functional.cosine_similarity(eps_u, eps_c - eps_u, dim=1).mean(dim=(1, 2))
        assert result.terms == pytest.approx(cos.tolist(), rel=1e-3, abs=1e-6)
        assert all(abs(term) > 1e-4 for term in result.terms)  # not the silent zero of s = 1
        mean_d = sum(g[0] for g in result.magnitudes) / 2
        assert result.score == pytest.approx(mean_d + 2.0 * sum(result.terms) / 2, rel=1e-6)
    if kind == "pixart":
        assert AnisotropyDetector(pipe, num_inference_steps=3).config.num_inference_steps == 3
        return
    with pytest.raises(UnsupportedModelError) as info:
        AnisotropyDetector(pipe, num_inference_steps=3)
    assert "give more --num-inference-steps" in str(info.value) and "\n" not in str(info.value)


def test_sharpness_is_the_curvature_of_the_score_difference(flow_pipes: dict[str, Any], kind: str) -> None:
    """`||J f f||^2` for f the guidance direction in score space (a flow model's: the velocity difference at
    s = 1), checked against a central finite difference of f along itself."""
    pipe = flow_pipes[kind]
    result = SharpnessDetector(pipe, seed=2).score(PROMPTS[:1])[0]
    wen = MagnitudeDetector(pipe, seed=2).score(PROMPTS[:1])[0]
    assert _flat(result.magnitudes) == pytest.approx(_flat(wen.magnitudes), rel=REL)
    denoiser = Denoiser(pipe)
    scheduler = denoiser.schedule(50)
    param, t = Parameterization.of(scheduler), scheduler.timesteps[0]
    x = denoiser.first_input(initial_noise(pipe, 1, 2), scheduler)
    cond, blank = encode(pipe, PROMPTS[:1]), denoiser.empty()
    scale = 1.0 if kind != "pixart" else float(param.alpha_sigma(t, x.device)[1])

    def f(z: torch.Tensor) -> torch.Tensor:
        c, u = denoiser.cfg(z, t, cond, blank)
        return (param.to_score(u, z, t) - param.to_score(c, z, t)).double() / scale

    with torch.no_grad():
        direction = f(x)
        h = 1e-2 * float(x.norm() / direction.norm())
        jvp = (f(x + h * direction.float()) - f(x - h * direction.float())) / (2 * h)
    assert result.score > 0 and result.score == pytest.approx(float(jvp.pow(2).sum()), rel=5e-2)


def test_generation_detectors_sample_as_the_family_pipeline_does(flow_pipes: dict[str, Any], kind: str) -> None:
    """carlini and step-norm run a plain guided call of the family's pipeline (Flux: true CFG): the monitor reads
    on it what Wen's all-steps score measures; Flux's default (no true CFG) is refused in one line."""
    pipe = flow_pipes[kind]
    guidance = FLUX_TRUE_CFG if kind == "flux" else None
    settings: dict[str, Any] = dict(generations=2, num_inference_steps=STEPS, guidance_scale=guidance)
    carlini = CarliniDetector(pipe, cluster_size=2, **settings).score(PROMPTS[:1])[0]
    wen = MagnitudeDetector(pipe, steps="all", **settings).score(PROMPTS[:1])[0]
    assert _flat(carlini.magnitudes) == pytest.approx(_flat(wen.magnitudes), rel=REL)
    assert carlini.score is not None and carlini.score <= 0 and len(carlini.terms or []) == 2
    step = StepNormDetector(pipe, **settings).score(PROMPTS[:1])[0]
    assert step.score is not None and len(step.magnitudes) == 2 and len(step.magnitudes[0]) == STEPS - 1
    if kind == "flux":
        for detector in (CarliniDetector, StepNormDetector):
            with pytest.raises(UnsupportedModelError) as info:
                detector(pipe, generations=2)
            assert "true-CFG scale above 1" in str(info.value) and "give --guidance above 1" in str(info.value)


def test_compare_shows_na_with_the_reason_for_a_refusing_detector(flow_dirs: dict[str, Path], tmp_path: Path,
                                                                  cli: Callable) -> None:
    mem, normal = tmp_path / "mem.txt", tmp_path / "normal.txt"
    mem.write_text("\n".join(PROMPTS) + "\n")
    normal.write_text("a cat\na dog on the table\nphoto of an old man\n")
    out = tmp_path / "cmp"
    result = cli("compare", "--model", flow_dirs["sd3"], "--memorized", mem, "--normal", normal, "--out", out,
                 "--num-inference-steps", 3, "--generations", 1, "--detectors", "wen,anisotropy,ren-le,sharpness",
                 "--mitigation-prompts", 0)
    assert result.exit_code == 0, result.output
    rows = {r["detector"]: r for r in json.loads((out / "report.json").read_text())["detection"]}
    assert rows["wen"]["auc"] is not None and rows["sharpness"]["auc"] is not None
    for name, why in (("anisotropy", "give more --num-inference-steps"),
                      ("ren-le", "joint attention has no cross-attention map")):
        assert rows[name]["auc"] is None and rows[name]["cost"] is None and why in rows[name]["unsupported"]
    md = (out / "report.md").read_text()
    assert "| anisotropy | n/a | n/a | n/a |" in md
    assert "- ren-le: n/a on this model: the ren-le detector reads UNet cross-attention maps" in md
    assert "- anisotropy: n/a on this model: the anisotropy cosine's step" in md


def test_explain_leave_one_out_on_t5_tokens(flow_pipes: dict[str, Any], kind: str) -> None:
    """Leave-one-out runs through the same detector; words are T5's (the longest window)."""
    pipe = flow_pipes[kind]
    prompt = PROMPTS[0]
    attribution = explain(pipe, prompt, generations=2)
    words = prompt.split()
    variants = [prompt] + [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    scores = [r.score for r in MagnitudeDetector(pipe, generations=2).score(variants)]
    assert attribution.score == pytest.approx(scores[0], rel=1e-6)
    assert [w.significance for w in attribution.words] == pytest.approx([scores[0] - s for s in scores[1:]],
                                                                        rel=1e-5, abs=1e-7)
    assert attribution.tokens == text_window(pipe)[0].tokenize(prompt)


def test_explain_gradient_over_each_encoders_tokens(flow_pipes: dict[str, Any], kind: str) -> None:
    """The gradient of the first-step score (in the score space: a flow model's velocity) with respect to the
    prompt's embeddings, computed here by hand; a word sums its tokens' norms over the encoders at the positions
    `prompt_positions` gives (SD3: CLIP after its BOS, T5 after the CLIP positions), tokens shown are T5's."""
    pipe = flow_pipes[kind]
    prompt, words = PROMPTS[1], PROMPTS[1].split()
    attribution = explain(pipe, prompt, method="gradient", guidance_scale=FLUX_TRUE_CFG if kind == "flux" else None)
    denoiser = Denoiser(pipe)
    scheduler = denoiser.schedule(50)
    param, t = Parameterization.of(scheduler), scheduler.timesteps[0]
    x = denoiser.first_input(initial_noise(pipe, 1, 0), scheduler)
    cond = encode(pipe, [prompt])
    e = cond.prompt_embeds.detach().clone().requires_grad_(True)
    with torch.no_grad():
        s_u = param.to_score(denoiser.predict(x, t, empty(pipe)), x, t)
    score = (param.to_score(denoiser.predict(x, t, cond.replace(e)), x, t) - s_u).flatten(1).norm(dim=1).mean()
    score.backward()
    per_pos = e.grad[0].norm(dim=-1)
    assert attribution.score == pytest.approx(score.item(), rel=1e-5)
    assert attribution.score == pytest.approx(MagnitudeDetector(pipe, generations=1).score([prompt])[0].score,
                                              rel=1e-5)
    parts = prompt_positions(pipe)
    assert [(type(tok).__name__, first) for tok, first, _ in parts] == {
        "sd3": [("CLIPTokenizer", 1), ("T5Tokenizer", 77)], "pixart": [("T5Tokenizer", 0)],
        "flux": [("T5Tokenizer", 0)]}[kind]
    expected = [0.0] * len(words)
    for tokenizer, first, _ in parts:
        pos = first
        for i, word in enumerate(words):
            n = len(tokenizer.tokenize(word))
            expected[i] += float(per_pos[pos : pos + n].sum())
            pos += n
    assert [w.significance for w in attribution.words] == pytest.approx(expected, rel=1e-4)
    assert attribution.tokens == text_window(pipe)[0].tokenize(prompt) and all(expected)


def test_detect_command_on_flow_models(flow_dirs: dict[str, Path], flow_pipes: dict[str, Any], tmp_path: Path,
                                       cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for kind in ("sd3", "pixart"):
        out = tmp_path / f"{kind}.jsonl"
        result = cli("detect", "--model", flow_dirs[kind], "--prompts", prompts, "--out", out, "--generations", "2")
        assert result.exit_code == 0, result.output
        rows = read_results(out)
        expected = MagnitudeDetector(flow_pipes[kind], generations=2).score(PROMPTS)
        assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], rel=1e-5)
        assert rows[0]["guidance_scale"] == FAMILY_GUIDANCE[type(flow_pipes[kind]).__name__]


# ------------------------------------------------------------------------------------------ bad input


def _copy(folder: Path, dest: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(folder, dest)
    edit(dest)
    return dest


def _edit_json(path: Path, **values: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _with_scheduler(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        _edit_json(folder / "model_index.json", scheduler=["diffusers", name])
        _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name=name)

    return edit


class NoNegativePrompt(FluxPipeline):
    """A FluxPipeline as diffusers had it before true CFG: its `__call__` takes no negative prompt."""

    def __call__(self, prompt: Any = None, guidance_scale: float = 3.5,  # type: ignore[override]
                 max_sequence_length: int = 512, **kwargs: Any) -> Any:
        return super().__call__(prompt=prompt, guidance_scale=guidance_scale, **kwargs)


def _one_line_error(cli: Callable, folder: Path, tmp_path: Path, *needles: str) -> None:
    """`load_pipeline` and `diffmem detect` both fail on `folder` with one line holding every needle."""
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(folder, device="cpu")
    assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles), str(info.value)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = cli("detect", "--model", folder, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines


def test_an_unsupported_pipeline_class_is_one_line(flow_dirs: dict[str, Path], tmp_path: Path, cli: Callable) -> None:
    folder = _copy(flow_dirs["sd3"], tmp_path / "img2img",
                   lambda f: _edit_json(f / "model_index.json", _class_name="StableDiffusion3Img2ImgPipeline"))
    _one_line_error(cli, folder, tmp_path, "StableDiffusion3Img2ImgPipeline", "StableDiffusion3Pipeline",
                    "PixArtSigmaPipeline", "FluxPipeline")


def test_a_flux_pipeline_without_negative_prompts_is_one_line(flow_dirs: dict[str, Path], tmp_path: Path,
                                                             cli: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loading.SUPPORTED_PIPELINES, "FluxPipeline", NoNegativePrompt)
    _one_line_error(cli, flow_dirs["flux"], tmp_path, "cannot run a negative prompt", "true_cfg_scale")


@pytest.mark.parametrize("part", ["transformer", "text_encoder_3"])
def test_pickled_transformer_weights_are_refused(flow_dirs: dict[str, Path], tmp_path: Path, cli: Callable,
                                                 part: str) -> None:
    """The safetensors-only rule covers the transformer and the third (T5) text encoder."""
    from safetensors.torch import load_file

    def pickle_part(folder: Path) -> None:
        weights = next((folder / part).glob("*.safetensors"))
        torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
        weights.unlink()

    folder = _copy(flow_dirs["sd3"], tmp_path / "pickled", pickle_part)
    _one_line_error(cli, folder, tmp_path, f"{part} holds pickled weights", "--allow-pickle")


@pytest.mark.parametrize(("kind", "scheduler", "needle"), [
    ("sd3", "DDIMScheduler", "Stable Diffusion 3 needs a FlowMatch scheduler"),
    ("flux", "EulerDiscreteScheduler", "Flux needs a FlowMatch scheduler"),
    ("pixart", "FlowMatchEulerDiscreteScheduler", "PixArt needs a diffusion scheduler"),
])
def test_a_scheduler_that_does_not_match_the_prediction_is_one_line(flow_dirs: dict[str, Path], tmp_path: Path,
                                                                     cli: Callable, kind: str, scheduler: str,
                                                                     needle: str) -> None:
    folder = _copy(flow_dirs[kind], tmp_path / kind, _with_scheduler(scheduler))
    _one_line_error(cli, folder, tmp_path, scheduler, needle)


# ------------------------------------------------------------------------------------ generation and mitigation


def _run_guidance(kind: str) -> float | None:
    """The `guidance_scale` of a generation run: the model's own, or for Flux a true-CFG scale above 1."""
    return FLUX_TRUE_CFG if kind == "flux" else None


def test_guard_passes_unflagged_prompts_bit_identical(flow_pipes: dict[str, Any], kind: str) -> None:
    """Plain sampling is the family's plain call (Flux: true CFG against ""), bit for bit; the guard keeps the
    unflagged prompt's images and mitigates the flagged one."""
    pipe = flow_pipes[kind]
    settings: dict[str, Any] = dict(generations=2, num_inference_steps=STEPS, output_type="latent",
                                    guidance_scale=_run_guidance(kind))
    plain = generate(pipe, PROMPTS, "none", **settings)
    noise = initial_noise(pipe, 2, 0)
    for images, prompt in zip(plain.images, PROMPTS, strict=True):
        by_hand = _call(pipe, kind, [prompt], noise, _guidance(pipe, kind), num_images_per_prompt=2)
        assert torch.equal(images, by_hand)
    scores = [d.score for d in plain.decisions]
    assert None not in scores and scores[0] != scores[1]
    low = min(range(2), key=lambda i: scores[i])  # type: ignore[arg-type,return-value]
    guarded = guarded_generate(pipe, PROMPTS, threshold=sum(scores) / 2, iters=2, target_loss=0.0,  # type: ignore
                               **settings)
    assert [d.flagged for d in guarded.decisions] == [i != low for i in range(2)]
    assert [d.mitigated for d in guarded.decisions] == [i != low for i in range(2)]
    default = "embedding" if kind == "flux" else "embedding-delayed"  # Flux: no CFG batch to delay
    assert [d.method for d in guarded.decisions] == [default] * 2
    assert torch.equal(guarded.images[low], plain.images[low])
    assert not torch.equal(guarded.images[1 - low], plain.images[1 - low])


def test_embedding_mitigation_optimises_the_text_states(flow_pipes: dict[str, Any], kind: str) -> None:
    """The first-step loss (velocity for SD3 and Flux, epsilon for PixArt) falls; the images are the optimised
    conditioning's, sampled against the empty prompt by a hand call (Flux: true CFG); SD3's and Flux's pooled
    embeddings stay, and SD3's BOS."""
    pipe, prompt = flow_pipes[kind], PROMPTS[0]
    settings: dict[str, Any] = dict(generations=2, num_inference_steps=STEPS, target_loss=0.0, iters=3, lr=0.05,
                                    guidance_scale=_run_guidance(kind))
    res = mitigate_embedding(pipe, prompt, **settings)
    detected = MagnitudeDetector(pipe, generations=2, num_inference_steps=STEPS).score([prompt])[0].score
    assert res.initial_loss == pytest.approx(detected, rel=1e-4)
    assert res.iters == 3 and res.final_loss < res.initial_loss and not res.reached
    cond, own = res.conditioning, encode(pipe, [prompt])
    assert cond is not None and not torch.equal(cond.prompt_embeds, own.prompt_embeds)
    if kind in ("sd3", "flux"):
        assert cond.pooled_embeds is not None and torch.equal(cond.pooled_embeds, own.pooled_embeds)
    if kind == "sd3":
        assert torch.equal(cond.prompt_embeds[:, 0], own.prompt_embeds[:, 0])
    else:  # T5 has no BOS: every position moves
        assert not torch.equal(cond.prompt_embeds[:, 0], own.prompt_embeds[:, 0])
    done = generate(pipe, [prompt], "embedding", output_type="latent", **settings)
    decision = done.decisions[0]
    assert (decision.mitigated, decision.iters, decision.final_loss) == (True, 3, pytest.approx(res.final_loss))
    denoiser = Denoiser(pipe)
    with torch.no_grad():
        by_hand = pipe(**denoiser.call_kwargs(cond.expand(2), empty(pipe).expand(2), _guidance(pipe, kind)),
                       latents=initial_noise(pipe, 2, 0), num_inference_steps=STEPS, output_type="latent").images
    assert torch.equal(done.images[0], by_hand)


@pytest.mark.parametrize("kind", ("sd3", "flux"))
@pytest.mark.parametrize("method", ("rta", "rna", "cwr"))
def test_text_baselines_sample_the_edited_prompt(flow_pipes: dict[str, Any], kind: str, method: str) -> None:
    """A text baseline samples its edited prompt as plain sampling would (Flux: by true CFG), from the same noise."""
    pipe = flow_pipes[kind]
    settings: dict[str, Any] = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=_run_guidance(kind))
    text = generate(pipe, PROMPTS[:1], method, k=2, **settings)
    edited = text.decisions[0].text
    assert len(edited.split()) == len(PROMPTS[0].split()) + 2 and text.images[0].shape[0] == 1
    assert torch.equal(text.images[0], generate(pipe, [edited], "none", **settings).images[0])


def test_mitigations_that_need_a_unet_or_a_cfg_batch_refuse(flow_pipes: dict[str, Any]) -> None:
    for kind, method, needle in (("sd3", "attention", "joint attention has no cross-attention map"),
                                 ("pixart", "nemo", "reads UNet cross-attention maps"),
                                 ("flux", "attention", "joint attention has no cross-attention map"),
                                 ("flux", "gni", "not adapted to Flux's true CFG"),
                                 ("flux", "delayed-guidance", "one of embedding, rta, rna, cwr, none"),
                                 ("flux", "none", "true-CFG scale above 1"),
                                 ("flux", "embedding", "give --guidance above 1")):
        with pytest.raises(UnsupportedModelError) as info:
            generate(flow_pipes[kind], PROMPTS[:1], method, num_inference_steps=STEPS)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_flux_run_without_true_cfg_is_one_line(flow_dirs: dict[str, Path], tmp_path: Path, cli: Callable) -> None:
    """`diffmem generate` on Flux at its own scale (true CFG off) exits 2 with one line saying what to give."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    result = cli("generate", "--model", flow_dirs["flux"], "--prompts", prompts, "--out", tmp_path / "out",
                 "--num-inference-steps", STEPS)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "give --guidance above 1" in lines[0], lines


def test_generate_and_mitigate_commands_on_sd3(flow_dirs: dict[str, Path], tmp_path: Path, cli: Callable) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for command, extra, method in (("generate", ["--guard", "--threshold", "-inf"], "embedding-delayed"),
                                   ("mitigate", ["--method", "embedding"], "embedding")):
        out = tmp_path / command
        result = cli(command, "--model", flow_dirs["sd3"], "--prompts", prompts, "--out", out,
                     "--num-inference-steps", STEPS, "--iters", 1, "--target-loss", 0, *extra)
        assert result.exit_code == 0, result.output
        rows = read_results(out / "results.jsonl")
        assert [(r["method"], r["mitigated"], r["iters"]) for r in rows] == [(method, True, 1)] * 2
        assert sorted(p.name for p in (out / "images").iterdir()) == ["0_0.png", "1_0.png"]
