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

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from diffmem.detectors.base import initial_noise
from diffmem.mitigate.base import (
    KEYWORDS,
    MITIGATIONS,
    Flagged,
    GenerationConfig,
    Sampler,
    default_mitigation,
    finite_or_none,
    prompt_seed,
)
from diffmem.models.defaults import ModelDefaults
from diffmem.models.families import family, network

__all__ = ["Decision", "GuardResult", "generate", "guarded_generate", "iter_generate", "prompt_seed"]


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


def iter_generate(
    pipe,
    prompts: Sequence[str],
    method: str | None = None,
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
    model's own when None).

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> prompts = [splits.planted[0].caption, splits.heldout[0].caption]  # memorized, held-out
        >>> for images, decision in iter_generate(pipe, prompts, threshold=1.0, num_inference_steps=10):
        ...     print(decision.flagged, decision.mitigated, images.shape)  # write each row as it comes
        True True (1, 32, 32, 3)
        False False (1, 32, 32, 3)
    """
    method = default_mitigation(family(pipe)) if method is None else method
    kind = MITIGATIONS.lookup(method, "--method")
    values = dict(zip(KEYWORDS, (target_loss, iters, lr, k, sigma), strict=True))
    mitigation = kind(pipe, kind.configure(values, method_options))  # first: it refuses a model it cannot run on
    defaults = ModelDefaults.of(pipe)
    generation = GenerationConfig(threshold=threshold, generations=generations, seed=seed,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  output_type=output_type).resolved(defaults)
    mitigation.prepare(prompts)
    net = network(pipe)
    noise = initial_noise(pipe, generations, seed).to(net.device, net.dtype)
    sampler = Sampler(pipe, generation, noise)
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)
    abort_at = None if kind.plain else (-math.inf if threshold is None else threshold)
    for prompt in prompts:
        start = time.perf_counter()
        try:
            images, score = sampler(abort_at=abort_at, prompt=prompt)
            final, text, n_iters, reached, changed, details = score, prompt, 0, None, False, None
        except Flagged as flag:
            score, changed = flag.score, True
            done = mitigation.apply(prompt, sampler)
            images, final, text, n_iters, reached, details = (done.images, done.final_loss, done.text, done.iters,
                                                              done.reached, done.details)
        sync()
        flagged = None if threshold is None else score >= threshold
        yield images, Decision(prompt, method, finite_or_none(score), flagged, changed, finite_or_none(final),
                               n_iters, reached, time.perf_counter() - start, text, details)


def generate(pipe, prompts: Sequence[str], method: str | None = None, **settings: Any) -> GuardResult:
    """Generate every prompt with one mitigation method (a name of `MITIGATIONS`; "none" samples plainly; None: the
    model's default, `default_mitigation`) applied
    to every prompt, or, with `threshold=T`, only to prompts whose first-step score is >= T (the guard).

    Settings: threshold, generations, seed, num_inference_steps, guidance_scale, output_type (`GenerationConfig`),
    target_loss, iters, lr (the embedding optimisation, and SAIL's), k (words inserted by rta/rna/cwr), sigma
    (gni), and method_options for the other options of a method (its `Config`: c1; sail_threshold, sail_weight;
    nemo_stats, nemo_threshold, nemo_generations, nemo_seed). Each is checked once, by the config that declares
    it. Random edits are seeded per prompt by `prompt_seed(seed, prompt)`.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> prompts = [splits.planted[0].caption, splits.heldout[0].caption]  # memorized, held-out
        >>> result = generate(pipe, prompts, "cwr", k=2, num_inference_steps=10)  # no threshold: every prompt
        >>> [decision.text for decision in result.decisions]  # doctest: +NORMALIZE_WHITESPACE
        ['at a orange ring at the center on a gradient background a',
         'a a red diamond at the center on a striped on background']
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
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> GuardResult:
    """Generate `prompts`, mitigating (by default with `default_mitigation`: embedding-delayed) those whose
    first-step score is >= `threshold`; unflagged prompts cost no extra denoiser call and give the plain pipeline's
    images.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> prompts = [splits.planted[0].caption, splits.heldout[0].caption]  # memorized, held-out
        >>> result = guarded_generate(pipe, prompts, threshold=1.0, num_inference_steps=10)  # calibrate it per schedule
        >>> [(round(d.score, 2), d.flagged, d.reached, d.final_loss < d.score) for d in result.decisions]
        [(1.23, True, True, True), (0.77, False, None, False)]
    """
    return generate(pipe, prompts, method, threshold=threshold, generations=generations, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    target_loss=target_loss, iters=iters, lr=lr, output_type=output_type,
                    method_options=method_options)
