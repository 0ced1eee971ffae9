"""Wen et al.'s inference-time mitigation (METHOD.md section 3): optimise the conditional text embedding at the
first step until its text-conditional noise magnitude falls to a target, then sample from the same `x_T`.

On SD3, PixArt and Flux (METHOD.md section 8) the same loss is taken in the score space of the model (`to_score`:
the velocity for SD3 and Flux, whose noise prediction at `s = 1` is its input for every prompt) over the tokens the
denoiser attends to: SD3's joint `prompt_embeds` (CLIP pair and T5) with its pooled projection kept fixed, PixArt's
T5 states, Flux's T5 states with its pooled CLIP embedding kept fixed (sampled by true CFG against the empty prompt).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.config import SamplingConfig, setting
from diffmem.mitigate.base import Calibrating, Mitigation, OptimisationConfig, Outcome, Sampler
from diffmem.models.conditioning import Conditioning, as_conditioning, encode, is_sdxl, prompt_mask, prompt_positions
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise
from diffmem.models.families import network
from diffmem.registry import NOT_VERIFIED


@dataclass
class EmbeddingResult:
    """The optimised conditioning of one prompt and the loss trace that produced it.

    `losses[0]` is the loss of the prompt's own embedding (its first-step detection score), `losses[i]` the loss
    after i AdamW steps; `losses[-1] == final_loss` is the loss of `embedding` itself. `conditioning` is the whole
    optimised conditioning (for SDXL with its pooled embedding), what `pipe(**conditioning.pipe_kwargs(...))` takes.
    """

    embedding: torch.Tensor
    losses: list[float] = field(default_factory=list)
    iters: int = 0
    reached: bool = False
    target_loss: float = math.nan  # the target it was optimised towards
    conditioning: Conditioning | None = None

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


@dataclass(frozen=True)
class EmbeddingConfig(OptimisationConfig):
    """The embedding optimisation's options: its first-step target (None: the model's own) and AdamW's steps."""

    target_loss: float | None = setting(None, option="--target-loss", finite=False)

    def resolved(self, defaults: ModelDefaults) -> EmbeddingConfig:
        return self.replace(target_loss=defaults.resolve_target_loss(self.target_loss))


class FirstStep:
    """The first DDIM step of `generations` initial noises: scores `L(e)` = mean over generations of
    `|| eps(x_T, e) - eps(x_T, e_0) ||_2` for a conditioning `e` (flow models: the velocity, `to_score`);
    `eps(x_T, e_0)` is computed once. The noises and their first-step input are detection's
    (`Denoiser.first_input`), so `L` of the prompt's own embedding is its first-step detection score."""

    def __init__(self, pipe, generations: int = 1, seed: int = 0, num_inference_steps: int = 50) -> None:
        self.pipe = pipe
        self.generations = generations
        self.denoiser = Denoiser(pipe)
        self.scheduler = self.denoiser.schedule(num_inference_steps)
        self.param = Parameterization.of(self.scheduler)
        self.t = self.scheduler.timesteps[0]
        self.model_in = self.denoiser.first_input(initial_noise(pipe, generations, seed), self.scheduler)
        self.uncond = self.denoiser.empty()
        self.eps_u = self.param.to_score(self.denoiser.shared_uncond(self.model_in, self.t), self.model_in, self.t)

    def _eps(self, embedding: Conditioning | torch.Tensor) -> torch.Tensor:
        e = as_conditioning(self.pipe, embedding).to(self.denoiser.dtype).expand(self.generations)
        return self.param.to_score(self.denoiser.predict(self.model_in, self.t, e), self.model_in, self.t)

    def loss(self, embedding: Conditioning | torch.Tensor) -> torch.Tensor:
        """`L(e)` for a one-row conditioning ((1, 77, D) for SD), differentiable with respect to it when grad is
        enabled."""
        return (self._eps(embedding) - self.eps_u).flatten(1).norm(dim=1).mean()


def mitigate_embedding(
    pipe,
    prompt: str,
    *,
    generations: int = 1,
    seed: int = 0,
    target_loss: float | None = None,
    iters: int = 10,
    lr: float = 0.05,
    guidance_scale: float | None = None,
    num_inference_steps: int = 50,
) -> EmbeddingResult:
    """Minimise `L(e)` over every position of the prompt's conditioning but BOS with AdamW(lr), stopping as soon
    as `L <= target_loss` or after `iters` steps; the result's embedding is what `pipe(prompt_embeds=...)` takes.

    Generation g starts from `initial_noise(pipe, generations, seed)[g]`, the noise a plain generation uses.
    `guidance_scale` does not enter the first-step loss; it is accepted so that every entry point takes the same
    sampling settings. Cost: `k + 1` conditional forward passes and `k` backward passes of the denoiser over
    `generations` rows for `k` steps, plus one unconditional forward. Gradients go to the embedding only: the
    denoiser's parameters never accumulate any. For SDXL the pooled text embedding is optimised with the
    cross-attention states: it conditions the UNet on the prompt too. SD3: its joint `prompt_embeds` but the
    first (CLIP's BOS) and the zero padding (`prompt_mask`: T5's rows when it has no T5), its pooled projection
    fixed; PixArt: every T5 position (T5 has no BOS); Flux: every T5 position, its pooled CLIP embedding fixed
    (it carries the prompt too, but the T5 states are what the joint attention reads token by token: the
    method's embedding is those).

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> result = mitigate_embedding(pipe, splits.planted[0].caption)  # towards the model's own target loss
        >>> round(result.initial_loss, 2), result.iters, result.reached, result.final_loss <= result.target_loss
        (0.77, 3, True, True)
        >>> pipe(prompt_embeds=result.embedding, num_inference_steps=10).images[0].size
        (32, 32)
    """
    SamplingConfig(generations=generations, seed=seed, num_inference_steps=num_inference_steps)  # checked
    config = EmbeddingConfig(target_loss=target_loss, iters=iters, lr=lr).resolved(ModelDefaults.of(pipe))
    target_loss, iters, lr = config.target_loss, config.iters, config.lr
    assert target_loss is not None  # resolved
    step = FirstStep(pipe, generations, seed, num_inference_steps)
    with torch.no_grad():
        cond = encode(pipe, [prompt]).to(torch.float32)
    fixed = prompt_positions(pipe)[0][1]  # the BOS position of a CLIP-first sequence stays (T5 has none)
    bos = cond.prompt_embeds[:, :fixed]
    rest = cond.prompt_embeds[:, fixed:].clone().requires_grad_(True)
    free = prompt_mask(pipe, cond.prompt_embeds)[fixed:]  # SD3's zero padding stays zero (AdamW moves any entry
    # with a gradient by about lr a step, however small the gradient: 256 rows of T5 zeros would swamp CLIP's 77)
    sdxl_pooled = cond.pooled_embeds if is_sdxl(pipe) else None  # SD3's pooled projection stays fixed
    pooled = None if sdxl_pooled is None else sdxl_pooled.clone().requires_grad_(True)
    params = [rest] if pooled is None else [rest, pooled]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def current() -> Conditioning:
        return cond.replace(torch.cat([bos, rest], dim=1), pooled)

    losses: list[float] = []
    while True:
        last = len(losses) == iters  # the loss of the final embedding needs no graph
        with torch.set_grad_enabled(not last):
            loss = step.loss(current())
        losses.append(float(loss.detach()))  # one host copy per step: the stopping rule needs it
        if losses[-1] <= target_loss or last:
            break
        for param, grad in zip(params, torch.autograd.grad(loss, params), strict=True):
            param.grad = grad * free if param is rest else grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = current().map(lambda t: t.detach()).to(network(pipe).dtype)
    return EmbeddingResult(final.prompt_embeds, losses, len(losses) - 1, losses[-1] <= target_loss, target_loss,
                           final)


class EmbeddingMitigation(Mitigation):
    """Wen et al.'s mitigation: the prompt's conditioning optimised at the first step (`mitigate_embedding`), then
    sampled from the same noise with the empty prompt as the negative one (Flux: by true CFG)."""

    name = "embedding"
    Config = EmbeddingConfig
    config: EmbeddingConfig
    paper = "Wen et al., ICLR 2024"
    published = NOT_VERIFIED + ": Wen et al., ICLR 2024"
    cost = "at most --iters forward + backward passes over the generations, then a generation"
    rank = 10
    in_paper_table = True
    runs_on_flux = True

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g = sampler.generation
        res = mitigate_embedding(self.pipe, prompt, generations=g.generations, seed=g.seed,
                                 target_loss=self.config.target_loss, iters=self.config.iters, lr=self.config.lr,
                                 num_inference_steps=g.num_inference_steps)
        assert res.conditioning is not None
        images, _ = sampler(**res.conditioning.pipe_kwargs(sampler.uncond))
        return Outcome(images, res.final_loss, prompt, res.iters, res.reached)

    calibrated = ("target_loss",)

    @classmethod
    def calibrate(cls, context: Calibrating) -> dict[str, Any]:
        """The target loss: the median first-step score of the non-memorized prompts."""
        from diffmem.detectors.magnitude import MagnitudeDetector

        g = context.generation
        scores = context.wen_scores.get(g.generations) or [r.score for r in MagnitudeDetector(
            context.pipe, generations=g.generations, seed=g.seed, num_inference_steps=g.num_inference_steps,
            batch_size=context.batch_size).score(context.normal) if r.score is not None]
        return {"target_loss": statistics.median(scores)}
