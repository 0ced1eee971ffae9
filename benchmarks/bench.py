"""diffmem's performance claims, measured in one run as ratios (run by `make bench`; writes out/bench.json).

(a) first-step detection of one batch, text encoding included, over one bare batched CFG UNet call of the same
    batch: on the tiny pipeline and on the Stable Diffusion v1.4 architecture (random weights, no download); the
    detector's shared empty-prompt prediction is computed once, in the warm-up, as in any scan of many batches;
(b) a full `pipe(...)` generation with the Monitor attached over one without it;
(c) prompts per second of MagnitudeDetector (first step, batch 32) over a per-prompt loop like the paper's;
(d) guarded generation (`diffmem.mitigate.guarded_generate`) of one prompt over a plain `pipe(...)` call of it, on
    the testbed pipeline: unflagged (threshold +inf) and flagged (threshold -inf, target loss 0 by default so that
    every optimisation iteration runs: the worst case);
(e) a gradient explanation (`diffmem.explanation.attribution.explain`, first step, one generation) of one prompt over
    its first-step detection, on the testbed pipeline;
(f) every peer detector (`diffmem.detectors.DETECTORS`: anisotropy, sharpness, Ren et al.'s LE and AE, Bright
    Ending, NeMo, step-norm, Carlini) over Wen's first-step detection, one batch of prompts, one generation (two
    for NeMo and Carlini, which compare generations), its authors' settings (50 steps where it reads a whole
    generation), on the testbed pipeline (informative: no target);
(h) (a) and (b) on the SD3 testbed (`testbed-sd3`: MMDiT, rectified flow, two CLIP encoders, no T5): first-step
    detection of one batch over one bare CFG transformer call, and a `pipe(...)` call with the Monitor over one
    without (informative: the SD3 architecture at the testbed's size, not SD3's);
(g) first-step detection rate (n=1) in prompts per second on the SD v1.4 and SDXL architectures (random weights,
    fp16 on CUDA) next to the per-prompt loop, its time over a bare batched denoiser call on the same conditional
    rows, and model FLOPs per second (counted with `torch.utils.flop_counter.FlopCounterMode` on a meta-device copy)
    as a share of the GPU's peak dense fp16 throughput. Target on one H100: >= 600 SD v1.4 prompts per second.
    On a CPU both rows shrink (smaller latents, batch 2) and the SDXL row reports its FLOPs only (its 3.5B
    parameters do not fit a small machine's memory in float32) unless --sdxl-cpu.

Timings interleave the compared variants and take medians after a warm-up; only ratios are reported, since
absolute times depend on the machine. On a CPU the SD1.4-architecture UNet takes tens of seconds per call, so
its batch (`--sd-batch`) and repeats are small there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from diffmem.detectors import DETECTORS  # noqa: E402
from diffmem.detectors.base import initial_noise  # noqa: E402
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.detectors.monitor import Monitor  # noqa: E402
from diffmem.explanation.attribution import explain  # noqa: E402
from diffmem.mitigate import guarded_generate  # noqa: E402
from diffmem.models.conditioning import Conditioning, empty, encode  # noqa: E402
from diffmem.models.denoiser import Denoiser  # noqa: E402
from diffmem.models.loading import load_pipeline, quiet_diffusers  # noqa: E402

TARGETS = {"a_sd14": ("<=", 1.15), "b": ("<=", 1.02), "c": (">=", 5.0), "d_unflagged": ("<=", 1.02),
           "d_flagged": ("<=", 1.5), "e": ("<=", 4.0)}

# Stable Diffusion v1.4's published unet/config.json and its text encoder's (CLIP ViT-L/14) config.
SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
)
SD14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# Not used by first-step detection: a small random VAE with SD's 8x downsampling stands in for SD's.
SMALL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)

SUBJECTS = ["a photo of a cat", "an oil painting of a lighthouse", "a watercolor of mountains at dawn",
            "a red sports car on a racetrack", "portrait of an old sailor", "a bowl of ramen, studio light",
            "a castle made of glass", "a robot reading a newspaper"]


def prompts(n: int) -> list[str]:
    """`n` distinct prompts of ordinary length."""
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}" for i in range(n)]


def sd14_pipeline(device: torch.device, dtype: torch.dtype, latent: int):
    """A StableDiffusionPipeline with SD v1.4's UNet and text encoder architectures and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.testbed.model import SCHEDULER_CONFIG, build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: much faster than on the host for 860M weights
        unet = UNet2DConditionModel(**{**SD14_UNET, "sample_size": latent})
        text = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
        vae = AutoencoderKL(**SMALL_VAE, sample_size=latent * 8)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=build_tokenizer(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


# SDXL base 1.0's published unet/config.json and its second text encoder's (OpenCLIP ViT-bigG/14); its first
# text encoder is SD v1.4's (CLIP ViT-L/14).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_TEXT_2 = {**SD14_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
#: Peak dense fp16 tensor throughput (TFLOP/s, no sparsity) by a substring of the CUDA device name; first match.
PEAK_FP16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.2))
SD14_RATE_TARGET = 600.0  # prompts per second at n=1 on one H100 (issue 21)


def sdxl_pipeline(device: torch.device | str, dtype: torch.dtype, latent: int):
    """A StableDiffusionXLPipeline with SDXL base's UNet and both text encoder architectures, random weights."""
    import copy

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffmem.testbed.model import build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**SDXL_UNET, "sample_size": latent})
        text = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
        vae = AutoencoderKL(**SMALL_VAE, sample_size=latent * 8)
    tokenizer_2 = copy.deepcopy(build_tokenizer())
    tokenizer_2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=build_tokenizer(),
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def tiny(device: torch.device, dtype: torch.dtype):
    """The tiny random SD1-style pipeline of the tests (32x32 px, 8x8x4 latents)."""
    from diffmem.testbed.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1").to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clock(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, the device synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


Variants = dict[str, Callable[[], object]]


def interleaved(variants: Variants, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each variant over `repeats` rounds, alternating their order round by round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(clock(variants[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def first_step_overhead(pipe, batch: int, repeats: int, device: torch.device) -> dict:
    """(a), (h) `MagnitudeDetector._score_batch` on one batch over one bare CFG call of the denoiser network
    (`Denoiser.predict`, the UNet or the transformer) on the same rows, their text encoded beforehand."""
    detector = MagnitudeDetector(pipe, batch_size=batch)
    batch_prompts = prompts(batch)
    denoiser = Denoiser(pipe)
    scheduler = denoiser.schedule(50)
    t = scheduler.timesteps[0]
    x = denoiser.first_input(initial_noise(pipe, 1, 0).repeat(batch, 1, 1, 1), scheduler)
    x2 = torch.cat([x, x])
    rows = Conditioning.cat([encode(pipe, batch_prompts), empty(pipe).expand(batch)])
    variants = {
        "bare": lambda: denoiser.predict(x2, t, rows),
        "detect": lambda: detector._score_batch(batch_prompts),
    }
    for fn in variants.values():  # warm-up; also fills the detector's cached empty-prompt embedding and noise
        fn()
    med = interleaved(variants, repeats, device)
    return {"batch": batch, "repeats": repeats, "seconds": med, "ratio": med["detect"] / med["bare"]}


def monitor_overhead(pipe, n_prompts: int, steps: int, repeats: int, device: torch.device) -> dict:
    """(b) a full `pipe(...)` call (CFG sampling, VAE decode) with the Monitor attached over one without."""
    batch_prompts = prompts(n_prompts)

    def generate() -> object:
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_prompts, num_inference_steps=steps, generator=generator, output_type="np").images

    def monitored() -> object:
        with Monitor(pipe) as monitor:
            images = generate()
        monitor.scores()  # reading the scores (one host copy) is part of the cost
        return images

    variants = {"plain": generate, "monitor": monitored}
    for fn in variants.values():
        fn()
    med = interleaved(variants, repeats, device)
    return {"prompts": n_prompts, "steps": steps, "repeats": repeats, "seconds": med,
            "ratio": med["monitor"] / med["plain"]}


@torch.no_grad()
def per_prompt_loop(pipe, batch_prompts: list[str], device: torch.device) -> list[float]:
    """The paper-style baseline: one prompt at a time, its and the empty prompt's conditioning, one CFG UNet call,
    `.item()`."""
    scores = []
    for prompt in batch_prompts:
        embeds = Conditioning.cat([empty(pipe), encode(pipe, [prompt])])
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(50, device=device)
        t = scheduler.timesteps[0]
        latents = initial_noise(pipe, 1, 0).to(device, pipe.unet.dtype) * scheduler.init_noise_sigma
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        pred = pipe.unet(model_in, t, **embeds.unet_kwargs()).sample
        eps_u, eps_c = pred.chunk(2)
        scores.append((eps_c - eps_u).float().norm().item())
    return scores


def throughput(pipe, n_prompts: int, batch: int, repeats: int, device: torch.device) -> dict:
    """(c) prompts per second of MagnitudeDetector (first step) over the per-prompt loop, same noise."""
    batch_prompts = prompts(n_prompts)
    detector = MagnitudeDetector(pipe, batch_size=batch)
    fast = [s.score for s in detector.score(batch_prompts)]  # the warm-up runs double as a check
    slow = per_prompt_loop(pipe, batch_prompts, device)
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast, slow, strict=True))
    if worst > 1e-2:  # both must compute the same scores, or the comparison means nothing
        raise SystemExit(f"the per-prompt loop disagrees with MagnitudeDetector (relative error {worst:.2g})")
    variants = {"per_prompt": lambda: per_prompt_loop(pipe, batch_prompts, device),
                "detector": lambda: detector.score(batch_prompts)}
    med = interleaved(variants, repeats, device)
    rates = {name: n_prompts / sec for name, sec in med.items()}
    return {"prompts": n_prompts, "batch": batch, "repeats": repeats, "prompts_per_second": rates,
            "max_relative_score_difference": worst, "ratio": rates["detector"] / rates["per_prompt"]}


def guard_overhead(pipe, steps: int, repeats: int, iters: int, target_loss: float, device: torch.device) -> dict:
    """(d) `guarded_generate` of one prompt, unflagged and flagged, over a plain pipeline call from the same noise."""
    prompt = prompts(1)[0]
    noise = initial_noise(pipe, 1, 0).to(device, pipe.unet.dtype)
    settings = dict(num_inference_steps=steps, iters=iters, target_loss=target_loss)
    decisions = {}

    def guarded(name: str, threshold: float) -> object:
        out = guarded_generate(pipe, [prompt], threshold=threshold, **settings)
        decisions[name] = out.decisions[0]
        return out.images

    variants = {
        "plain": lambda: pipe(prompt, latents=noise, num_inference_steps=steps, output_type="np").images,
        "unflagged": lambda: guarded("unflagged", float("inf")),
        "flagged": lambda: guarded("flagged", float("-inf")),
    }
    for fn in variants.values():
        fn()
    med = interleaved(variants, repeats, device)
    return {"steps": steps, "repeats": repeats, "iters_used": decisions["flagged"].iters, "max_iters": iters,
            "target_loss": target_loss, "seconds": med,
            "ratio_unflagged": med["unflagged"] / med["plain"], "ratio_flagged": med["flagged"] / med["plain"]}


def explain_cost(pipe, repeats: int, device: torch.device) -> dict:
    """(e) `explain(pipe, prompt)` (gradient, first step, n=1) over `MagnitudeDetector(pipe).score([prompt])`."""
    prompt = prompts(1)[0]
    detector = MagnitudeDetector(pipe)
    variants = {"detect": lambda: detector.score([prompt]), "explain": lambda: explain(pipe, prompt)}
    for fn in variants.values():
        fn()
    med = interleaved(variants, repeats, device)
    return {"repeats": repeats, "seconds": med, "ratio": med["explain"] / med["detect"]}


def peer_cost(pipe, batch: int, repeats: int, device: torch.device) -> dict:
    """(f) one batch of prompts scored by each peer detector (its authors' settings, one generation; two for the
    detectors that compare generations) over the same prompts scored by `MagnitudeDetector` (first step, n=1)."""
    batch_prompts = prompts(batch)
    variants = {}
    for name, cls in DETECTORS.items():
        n = cls.min_generations
        detector = cls(pipe, generations=n, batch_size=batch * n)
        variants[name] = lambda d=detector: d.score(batch_prompts)
    for fn in variants.values():  # warm-up; also fills each detector's shared empty-prompt predictions
        fn()
    med = interleaved(variants, repeats, device)
    generations = {name: cls.min_generations for name, cls in DETECTORS.items()}
    return {"batch": batch, "repeats": repeats, "seconds": med, "generations": generations,
            **{f"ratio_{name}": med[name] / med["wen"] for name in DETECTORS if name != "wen"}}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's peak dense fp16 FLOP/s: `override_tflops`, else looked up by CUDA device name (None: unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_FP16_TFLOPS if key in name), None)


@torch.no_grad()
def flops_per_prompt(build: Callable[[torch.device, torch.dtype, int], object], latent: int) -> dict[str, float]:
    """Model FLOPs of one prompt's first-step detection at n=1, on a meta-device build (no memory, no compute):
    its text encoding and one conditional UNet row (the shared empty-prompt row is computed once per scan)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe: Any = build(torch.device("meta"), torch.float16, latent)
    with FlopCounterMode(display=False) as text_counter:
        cond = encode(pipe, prompts(1))
    x = torch.zeros(1, pipe.unet.config.in_channels, latent, latent, device="meta", dtype=torch.float16)
    with FlopCounterMode(display=False) as unet_counter:
        pipe.unet(x, torch.tensor(999.0, device="meta"), **cond.unet_kwargs())
    return {"text": float(text_counter.get_total_flops()), "unet_row": float(unet_counter.get_total_flops())}


@torch.no_grad()
def first_step_rate(pipe, batch: int, repeats: int, device: torch.device, flops: dict[str, float],
                    peak: float | None) -> dict:
    """(g) prompts per second of first-step detection (n=1, one batch of `batch` prompts, text encoding and the host
    copy included), of the per-prompt loop, and of a bare UNet call on the same `batch` conditional rows; model
    FLOP/s of each as a share of `peak`."""
    detector = MagnitudeDetector(pipe, batch_size=batch)
    batch_prompts = prompts(batch)
    scheduler = detector._schedule()
    x = detector._first_input(scheduler).repeat(batch, 1, 1, 1)
    cond = encode(pipe, batch_prompts)
    t = scheduler.timesteps[0]
    variants = {
        "detector": lambda: detector._score_batch(batch_prompts),
        "bare": lambda: pipe.unet(x, t, **cond.unet_kwargs(), return_dict=False),
        "per_prompt": lambda: per_prompt_loop(pipe, batch_prompts, device),
    }
    for fn in variants.values():  # warm-up; also fills the detector's cached empty-prompt prediction
        fn()
    med = interleaved(variants, repeats, device)
    rate = {name: batch / sec for name, sec in med.items()}
    per_prompt_flops = {"detector": flops["text"] + flops["unet_row"], "bare": flops["unet_row"],
                        "per_prompt": 2 * flops["text"] + 2 * flops["unet_row"]}
    achieved = {name: per_prompt_flops[name] * rate[name] for name in rate}
    backends = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled()}
    return {"batch": batch, "repeats": repeats, "seconds": med, "prompts_per_second": rate,
            "model_gflops_per_prompt": {k: v / 1e9 for k, v in per_prompt_flops.items()},
            "achieved_tflops": {k: v / 1e12 for k, v in achieved.items()},
            "share_of_peak": None if peak is None else {k: v / peak for k, v in achieved.items()},
            "peak_tflops": None if peak is None else peak / 1e12,
            "ratio_to_bare": med["detector"] / med["bare"], "speedup_over_loop": rate["detector"] / rate["per_prompt"],
            "sdpa_backends_enabled": backends, "torch_compile": False, "cuda_graphs": False}


def rate_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """(g) for the SD v1.4 and SDXL architectures; on a CPU smaller latents, and SDXL's FLOPs only."""
    cuda = device.type == "cuda"
    peak = peak_flops(device, args.peak_tflops)
    batch = args.rate_batch or (128 if cuda else 2)
    repeats = args.rate_repeats or (10 if cuda else 3)
    out: dict = {}
    archs = [("g_sd14", sd14_pipeline, args.rate_sd_latent or (64 if cuda else 16))]
    if not args.skip_sdxl:
        archs.append(("g_sdxl", sdxl_pipeline, args.rate_sdxl_latent or (128 if cuda else 16)))
    for key, build, latent in archs:
        flops = flops_per_prompt(build, latent)
        if key == "g_sdxl" and not cuda and not args.sdxl_cpu:
            out[key] = {"latent": latent, "skipped": "timing needs a GPU (or --sdxl-cpu)",
                        "model_gflops_per_prompt": {"detector": (flops["text"] + flops["unet_row"]) / 1e9}}
            continue
        print(f"(g) {key.removeprefix('g_')} architecture, batch {batch}, {latent}x{latent} latents ...", flush=True)
        pipe = build(device, dtype, latent)
        out[key] = {"latent": latent, **first_step_rate(pipe, batch, repeats, device, flops, peak)}
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    return out


def print_rates(report: dict, device: torch.device) -> None:
    """The (g) table: prompts per second, ratio to the bare call, share of peak; and the SD v1.4 target."""
    keys = [k for k in ("g_sd14", "g_sdxl") if k in report]
    if not keys:
        return
    print(f"\n{'(g) first-step detection, n=1':34} {'prompts/s':>10} {'loop p/s':>9} {'/ bare':>7} "
          f"{'TFLOP/s':>8} {'of peak':>8} {'bare of peak':>13}")
    for key in keys:
        r = report[key]
        label = f"{key.removeprefix('g_')} arch, {r['latent']}x{r['latent']} latents"
        if "skipped" in r:
            gflops = r["model_gflops_per_prompt"]["detector"]
            print(f"{label:34} skipped: {r['skipped']}; {gflops:.0f} GFLOP per prompt")
            continue
        share = r["share_of_peak"] or {}
        pct = {k: f"{v:.1%}" for k, v in share.items()}
        print(f"{label:34} {r['prompts_per_second']['detector']:10.1f} {r['prompts_per_second']['per_prompt']:9.1f} "
              f"{r['ratio_to_bare']:7.3f} {r['achieved_tflops']['detector']:8.2f} {pct.get('detector', 'n/a'):>8} "
              f"{pct.get('bare', 'n/a'):>13}")
    sd = report.get("g_sd14")
    if sd and "skipped" not in sd and device.type == "cuda" and sd["latent"] == 64:
        rate = sd["prompts_per_second"]["detector"]
        sd["target"] = f">= {SD14_RATE_TARGET:g} prompts/s: {'ok' if rate >= SD14_RATE_TARGET else 'MISSED'}"
        print(f"SD v1.4 at 512 px, n=1: {rate:.0f} prompts/s, target {sd['target']}")


def verdict(key: str, value: float) -> str:
    """`value` against its target: e.g. `<= 1.15: ok`."""
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}: {'ok' if ok else 'MISSED'}"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmarks, print the table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 elsewhere")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tiny-batch", type=int, default=32)
    parser.add_argument("--tiny-repeats", type=int, default=7)
    parser.add_argument("--sd-batch", type=int, default=None, help="default: 2 on CPU, 32 on CUDA")
    parser.add_argument("--sd-latent", type=int, default=64, help="latent side (64 = 512 px, SD v1.4's)")
    parser.add_argument("--sd-repeats", type=int, default=None, help="default: 3 on CPU, 10 on CUDA")
    parser.add_argument("--skip-sd", action="store_true", help="leave out the SD1.4-architecture model")
    parser.add_argument("--skip-sd3", action="store_true", help="leave out the SD3 testbed (h)")
    parser.add_argument("--sd3-only", action="store_true", help="run only the SD3 testbed's rows (h)")
    parser.add_argument("--monitor-prompts", type=int, default=8)
    parser.add_argument("--monitor-steps", type=int, default=20)
    parser.add_argument("--sd-monitor-steps", type=int, default=0,
                        help="also time the monitor on the SD1.4-architecture model, this many steps (0: no)")
    parser.add_argument("--prompts", type=int, default=128, help="prompts for the throughput comparison (c)")
    parser.add_argument("--guard-steps", type=int, default=50, help="sampling steps of the guard comparison (d)")
    parser.add_argument("--guard-repeats", type=int, default=15,
                        help="interleaved rounds of (d): its unflagged ratio is within 2%% of 1, so it needs more")
    parser.add_argument("--guard-iters", type=int, default=10, help="optimisation iterations of a flagged prompt")
    parser.add_argument("--guard-target-loss", type=float, default=0.0,
                        help="target loss of a flagged prompt (default 0: every iteration runs, the worst case)")
    parser.add_argument("--guard-only", action="store_true", help="run only the testbed comparisons (d) and (e)")
    parser.add_argument("--rate-only", action="store_true", help="run only the first-step rates (g)")
    parser.add_argument("--skip-rates", action="store_true", help="leave out the first-step rates (g)")
    parser.add_argument("--rate-batch", type=int, default=None, help="(g) prompts per batch (default: 128 on CUDA, "
                        "2 on CPU)")
    parser.add_argument("--rate-repeats", type=int, default=None, help="(g) rounds (default: 10 on CUDA, 3 on CPU)")
    parser.add_argument("--rate-sd-latent", type=int, default=None, help="(g) SD v1.4 latent side (64 on CUDA)")
    parser.add_argument("--rate-sdxl-latent", type=int, default=None, help="(g) SDXL latent side (128 on CUDA)")
    parser.add_argument("--skip-sdxl", action="store_true", help="(g) leave out the SDXL architecture")
    parser.add_argument("--sdxl-cpu", action="store_true", help="(g) time SDXL on a CPU too (needs ~15 GB)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="(g) the device's peak dense fp16 TFLOP/s (default: known GPUs by name)")
    parser.add_argument("--out", type=Path, default=Path("out/bench.json"))
    args = parser.parse_args(argv)

    quiet_diffusers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    sd_batch = args.sd_batch or (32 if cuda else 2)
    sd_repeats = args.sd_repeats or (10 if cuda else 3)
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    env = {"device": f"{device} ({name})", "dtype": str(dtype).removeprefix("torch."),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    print(f"device {env['device']}, {env['dtype']}, torch {env['torch']}, "
          f"{env['torch_threads']} torch threads ({env['cpu_count']} CPUs)", flush=True)

    report: dict = {"environment": env}
    if args.sd3_only:
        sd3_rows(report, args, device, dtype)
        return write_report(report, args.out)
    if args.rate_only:
        report.update(rate_rows(args, device, dtype))
        print_rates(report, device)
        return write_report(report, args.out)
    if not args.guard_only:
        small = tiny(device, dtype)
        print("(a) tiny ...", flush=True)
        report["a_tiny"] = first_step_overhead(small, args.tiny_batch, args.tiny_repeats, device)
        print("(b) tiny ...", flush=True)
        report["b"] = monitor_overhead(small, args.monitor_prompts, args.monitor_steps, args.tiny_repeats, device)
        print("(c) tiny ...", flush=True)
        report["c"] = throughput(small, args.prompts, args.tiny_batch, max(3, args.tiny_repeats // 3), device)
    print(f"(d) testbed, guarded generation, {args.guard_steps} steps ...", flush=True)
    testbed = load_pipeline("testbed", device=device, dtype=dtype)
    report["d"] = guard_overhead(testbed, args.guard_steps, args.guard_repeats, args.guard_iters,
                                 args.guard_target_loss, device)
    report["d_unflagged"] = {"ratio": report["d"]["ratio_unflagged"]}
    report["d_flagged"] = {"ratio": report["d"]["ratio_flagged"]}
    print("(e) testbed, gradient explanation ...", flush=True)
    report["e"] = explain_cost(testbed, 3 * args.tiny_repeats, device)
    print(f"(f) testbed, peer detectors, batch {args.tiny_batch} ...", flush=True)
    report["f"] = peer_cost(testbed, args.tiny_batch, args.tiny_repeats, device)
    for name in DETECTORS:
        if name != "wen":
            report[f"f_{name}"] = {"ratio": report["f"][f"ratio_{name}"]}
    if not args.skip_sd and not args.guard_only:
        print(f"(a) SD1.4 architecture, batch {sd_batch}, {args.sd_latent}x{args.sd_latent} latents ...",
              flush=True)
        sd = sd14_pipeline(device, dtype, args.sd_latent)
        report["a_sd14"] = first_step_overhead(sd, sd_batch, sd_repeats, device)
        report["a_sd14"]["latent"] = args.sd_latent
        if args.sd_monitor_steps:
            print("(b) SD1.4 architecture ...", flush=True)
            report["b_sd14"] = monitor_overhead(sd, 1, args.sd_monitor_steps, sd_repeats, device)
        del sd
    if not args.skip_sd3 and not args.guard_only:
        sd3_rows(report, args, device, dtype)
    if not args.skip_rates and not args.guard_only:
        report.update(rate_rows(args, device, dtype))

    rows = [
        ("(a) first-step detection / bare CFG UNet call, tiny", "a_tiny", None),
        ("(a) first-step detection / bare CFG UNet call, SD1.4 arch", "a_sd14", "a_sd14"),
        ("(b) pipe() with Monitor / without, tiny", "b", "b"),
        ("(b) pipe() with Monitor / without, SD1.4 arch", "b_sd14", "b"),
        ("(c) MagnitudeDetector / per-prompt loop, prompts/s, tiny", "c", "c"),
        ("(d) guarded / plain generation, unflagged prompt, testbed", "d_unflagged", "d_unflagged"),
        ("(d) guarded / plain generation, flagged prompt, testbed", "d_flagged", "d_flagged"),
        ("(e) gradient explanation / first-step detection, testbed", "e", "e"),
        ("(h) first-step detection / bare CFG transformer call, SD3 testbed", "h_detect", None),
        ("(h) pipe() with Monitor / without, SD3 testbed", "h_monitor", "b"),
    ] + [(f"(f) {name} detector{f' (n={cls.min_generations})' if cls.min_generations > 1 else ''} / Wen first-step "
          "detection, testbed", f"f_{name}", None) for name, cls in DETECTORS.items() if name != "wen"]
    print(f"\n{'measurement':60} {'ratio':>8}  target")
    for label, key, target in rows:
        if key in report:
            value = report[key]["ratio"]
            report[key]["target"] = verdict(target, value) if target else "none (informative)"
            print(f"{label:60} {value:8.3f}  {report[key]['target']}")
    details = []
    if "a_tiny" in report:
        details.append(f"(a) tiny batch {report['a_tiny']['batch']}")
    if "a_sd14" in report:
        details.append(f"SD1.4 batch {report['a_sd14']['batch']} ({report['a_sd14']['repeats']} repeats)")
    if "b" in report:
        details.append(f"(b) {report['b']['prompts']} prompts x {report['b']['steps']} steps")
        details.append(f"(c) {report['c']['prompts']} prompts, batch {report['c']['batch']}")
    d = report["d"]
    details.append(f"(d) 1 prompt x {d['steps']} steps, flagged: {d['iters_used']} of {d['max_iters']} iterations "
                   f"(target loss {d['target_loss']:g}), {d['repeats']} repeats")
    details.append(f"(f) batch {report['f']['batch']}, n=1")
    print("; ".join(details))
    print_rates(report, device)
    return write_report(report, args.out)


def sd3_rows(report: dict, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """(h) on the SD3 testbed: detection over a bare CFG transformer call, and the monitor's overhead."""
    print(f"(h) SD3 testbed, batch {args.tiny_batch} ...", flush=True)
    sd3 = load_pipeline("testbed-sd3", device=device, dtype=dtype)
    report["h_detect"] = first_step_overhead(sd3, args.tiny_batch, args.tiny_repeats, device)
    report["h_monitor"] = monitor_overhead(sd3, args.monitor_prompts, args.monitor_steps, args.tiny_repeats, device)
    for key, label in (("h_detect", "first-step detection / bare CFG transformer call"),
                       ("h_monitor", "pipe() with Monitor / without")):
        print(f"(h) {label}, SD3 testbed: {report[key]['ratio']:.3f}")


def write_report(report: dict, out: Path) -> dict:
    """Write the JSON report and return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
