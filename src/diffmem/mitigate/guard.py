"""Generation with inference-time mitigation, optionally guarded by first-step detection.

Design: each prompt is one ordinary `pipe(...)` call from `initial_noise(pipe, generations, seed)` (generation g
from seed + g). A `Monitor` hook reads the first-step score off the CFG batch the pipeline computes anyway and is
detached after that step, comparing it with the threshold as it records it.
- Unflagged (score < threshold): the call simply runs on. No extra denoiser evaluation, and the images are
  bit-identical to `pipe(prompt, num_images_per_prompt=n, latents=noise, ...)`.
- Flagged: the hook aborts the call at its first step (one CFG step of the 50 is thrown away), the
  mitigation is applied (for `embedding`, `mitigate_embedding`: at most `iters` forward + backward passes over
  the conditional rows), and a normal generation runs from the same noise with the mitigated conditioning and the
  empty prompt's embedding as the negative one. Cost: one step + the optimisation + one generation.
Without a threshold every prompt is mitigated; its score still comes from an aborted first step.
Prompts run one at a time (a batch of several prompts would make a flagged prompt restart its neighbours).
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from diffmem.detectors.base import initial_noise
from diffmem.detectors.monitor import Monitor
from diffmem.errors import InputError
from diffmem.mitigate import ALL_METHODS, PEER_METHODS
from diffmem.mitigate.baselines import cwr, gni, rna, rta
from diffmem.mitigate.embedding import check_settings, mitigate_embedding
from diffmem.models.conditioning import Conditioning, empty, encode
from diffmem.models.defaults import ModelDefaults


@dataclass
class Decision:
    """What happened to one prompt.

    `score`: its first-step detection score (mean `d_t` over generations), None if not finite. `flagged`:
    score >= threshold (None without a threshold: then every prompt gets the method). `final_loss`: the first-step
    `d_t` of the conditioning the images were sampled with (the optimised loss for `embedding`, the score
    itself when nothing was changed). `iters`/`reached`: optimisation steps taken and whether the loss reached
    the target (`reached` is None unless the embedding was optimised). `text`: the prompt actually sampled.
    """

    prompt: str
    method: str
    score: float | None
    flagged: bool | None
    mitigated: bool
    final_loss: float | None
    iters: int
    reached: bool | None
    seconds: float
    text: str
    details: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GuardResult:
    """Per prompt, in input order: the pipeline's images of its generations and the decision taken."""

    images: list[Any]
    decisions: list[Decision]


class _Flagged(Exception):
    """Raised from the monitor's first-step record to stop a generation whose prompt is to be mitigated."""

    def __init__(self, score: float) -> None:
        super().__init__(score)
        self.score = score


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def prompt_seed(seed: int, prompt: str) -> int:
    """The seed of a prompt's random baseline edits: fixed per (seed, prompt), so neither order nor resume
    changes it, and different prompts get different draws."""
    return (seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % 2**63


def edit_prompt(method: str, prompt: str, tokenizer, k: int, seed: int) -> str:
    """The prompt as the text baseline `method` (rta, rna or cwr) edits it."""
    if method == "rta":
        return rta(prompt, tokenizer, k, seed)
    return {"rna": rna, "cwr": cwr}[method](prompt, k, seed)


def _sample(pipe, noise: torch.Tensor, settings: dict[str, Any], abort_at: float | None = None,
            **conditioning: Any) -> tuple[Any, float]:
    """One pipeline call from `noise` and the first-step score read off its CFG batch; with `abort_at`, a score
    >= abort_at raises `_Flagged` right after the first step. `conditioning`: prompt=..., or prompt_embeds=...
    and negative_prompt_embeds=... (one row, or one per generation)."""
    n = noise.shape[0]
    first: list[float] = []

    def on_first_step(magnitudes: torch.Tensor) -> None:
        first.append(float(magnitudes.double().mean()))  # the one host copy of the guard
        if abort_at is not None and first[0] >= abort_at:
            raise _Flagged(first[0])

    monitor = Monitor(pipe, stop_after=1, on_record=on_first_step)  # later steps run without the hook
    embeds = conditioning.get("prompt_embeds")
    per_prompt = n if embeds is None or embeds.shape[0] == 1 else 1
    with monitor:
        out = pipe(**conditioning, num_images_per_prompt=per_prompt, latents=noise,
                   num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                   output_type=settings["output_type"])
    return out.images, first[0]


def _check(method: str, threshold: float | None, guidance_scale: float, num_inference_steps: int) -> None:
    if method not in ALL_METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(ALL_METHODS)}")
    if threshold is not None and math.isnan(threshold):
        raise InputError("--threshold must be a number, not nan")
    if not (math.isfinite(guidance_scale) and guidance_scale > 1):
        raise InputError(f"--guidance must be above 1 (classifier-free guidance), not {guidance_scale}")
    if num_inference_steps < 1:
        raise InputError(f"--steps must be at least 1, not {num_inference_steps}")


def iter_generate(
    pipe,
    prompts: Sequence[str],
    method: str = "embedding",
    *,
    threshold: float | None = None,
    generations: int = 1,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    target_loss: float | None = None,
    iters: int = 10,
    lr: float = 0.05,
    k: int = 4,
    sigma: float = 0.1,
    output_type: str = "np",
    method_options: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, Decision]]:
    """Yield (images, decision) per prompt, in order; see `generate` for the arguments (`guidance_scale`: the
    model's own when None)."""
    defaults = ModelDefaults.of(pipe)
    guidance_scale = defaults.resolve_guidance(guidance_scale)
    _check(method, threshold, guidance_scale, num_inference_steps)
    options = dict(method_options or {})
    if options or method in PEER_METHODS:
        from diffmem.mitigate.peers import check_options

        check_options(method, options)
    target_loss = defaults.resolve_target_loss(target_loss)
    check_settings(generations, target_loss, iters, lr)
    settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type=output_type)
    noise = initial_noise(pipe, generations, seed).to(pipe.unet.device, pipe.unet.dtype)

    @functools.cache
    def uncond() -> Conditioning:
        """The empty prompt's conditioning, encoded only once a prompt needs it (unflagged prompts never do)."""
        with torch.no_grad():
            return empty(pipe)

    def mitigated(prompt: str) -> tuple[Any, float, str, int, bool | None, dict[str, Any] | None]:
        """Images, final loss, sampled text, optimisation steps, `reached` and details of `method` on `prompt`."""
        if method in PEER_METHODS:
            from diffmem.mitigate.peers import run_peer

            images, final, n_iters, reached, details = run_peer(
                method, pipe, prompt, noise, settings, _sample, generations=generations, seed=seed, iters=iters,
                lr=lr, options=options)
            return images, final, prompt, n_iters, reached, details
        if method == "embedding":
            res = mitigate_embedding(pipe, prompt, generations=generations, seed=seed, target_loss=target_loss,
                                     iters=iters, lr=lr, num_inference_steps=num_inference_steps)
            assert res.conditioning is not None
            images, _ = _sample(pipe, noise, settings, **res.conditioning.pipe_kwargs(uncond()))
            return images, res.final_loss, prompt, res.iters, res.reached, None
        rseed = prompt_seed(seed, prompt)
        if method == "gni":
            with torch.no_grad():
                cond = encode(pipe, [prompt]).expand(generations)
            noisy = cond.replace(gni(cond.prompt_embeds, sigma, rseed))  # SDXL: the pooled embedding stays
            images, final = _sample(pipe, noise, settings, **noisy.pipe_kwargs(uncond().expand(generations)))
            return images, final, prompt, 0, None, None
        text = edit_prompt(method, prompt, pipe.tokenizer, k, rseed)
        images, final = _sample(pipe, noise, settings, prompt=text)
        return images, final, text, 0, None, None

    sync = torch.cuda.synchronize if pipe.unet.device.type == "cuda" else (lambda: None)
    abort_at = None if method == "none" else (-math.inf if threshold is None else threshold)
    for prompt in prompts:
        start = time.perf_counter()
        try:
            images, score = _sample(pipe, noise, settings, abort_at, prompt=prompt)
            final, text, n_iters, reached, changed, details = score, prompt, 0, None, False, None
        except _Flagged as flag:
            score, changed = flag.score, True
            images, final, text, n_iters, reached, details = mitigated(prompt)
        sync()
        flagged = None if threshold is None else score >= threshold
        yield images, Decision(prompt, method, _finite(score), flagged, changed, _finite(final), n_iters, reached,
                               time.perf_counter() - start, text, details)


def generate(pipe, prompts: Sequence[str], method: str = "embedding", **settings: Any) -> GuardResult:
    """Generate every prompt with one mitigation method (`METHODS`; "none" samples plainly) applied to every
    prompt, or, with `threshold=T`, only to prompts whose first-step score is >= T (the guard).

    Settings: threshold, generations, seed, num_inference_steps, guidance_scale, target_loss, iters, lr (the
    embedding optimisation, and SAIL's), k (words inserted by rta/rna/cwr), sigma (gni), output_type, and
    method_options for the peer methods (`PEER_METHODS`, see `diffmem.mitigate.peers`). Random edits are seeded
    per prompt by `prompt_seed(seed, prompt)`.
    """
    images, decisions = [], []
    for img, decision in iter_generate(pipe, prompts, method, **settings):
        images.append(img)
        decisions.append(decision)
    return GuardResult(images, decisions)


def guarded_generate(
    pipe,
    prompts: Sequence[str],
    *,
    threshold: float,
    generations: int = 1,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    target_loss: float | None = None,
    iters: int = 10,
    lr: float = 0.05,
    output_type: str = "np",
    method: str = "embedding",
    method_options: dict[str, Any] | None = None,
) -> GuardResult:
    """Generate `prompts`, mitigating (by default with the embedding optimisation) those whose first-step score
    is >= `threshold`; unflagged prompts cost no extra denoiser call and give the plain pipeline's images."""
    return generate(pipe, prompts, method, threshold=threshold, generations=generations, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    target_loss=target_loss, iters=iters, lr=lr, output_type=output_type,
                    method_options=method_options)
