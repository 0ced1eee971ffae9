"""Wen et al.'s inference-time mitigation (METHOD.md section 3): optimise the conditional text embedding at the
first step until its text-conditional noise magnitude falls to a target, then sample from the same `x_T`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning, as_conditioning, encode
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise


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


def check_settings(generations: int, target_loss: float, iters: int, lr: float) -> None:
    """Fail with one line on settings the optimisation cannot use."""
    if generations < 1:
        raise InputError(f"--generations must be at least 1, not {generations}")
    if math.isnan(target_loss):
        raise InputError("--target-loss must be a number, not nan")
    if iters < 0:
        raise InputError(f"--iters must be 0 or more, not {iters}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr must be a positive number, not {lr}")


class FirstStep:
    """The first DDIM step of `generations` initial noises: scores `L(e)` = mean over generations of
    `|| eps(x_T, e) - eps(x_T, e_0) ||_2` for a conditioning `e`; `eps(x_T, e_0)` is computed once. The noises
    and their first-step input are detection's (`Denoiser.first_input`), so `L` of the prompt's own embedding is
    its first-step detection score."""

    def __init__(self, pipe, generations: int = 1, seed: int = 0, num_inference_steps: int = 50) -> None:
        self.pipe = pipe
        self.generations = generations
        self.denoiser = Denoiser(pipe)
        self.scheduler = self.denoiser.schedule(num_inference_steps)
        self.param = Parameterization.of(self.scheduler)
        self.t = self.scheduler.timesteps[0]
        self.model_in = self.denoiser.first_input(initial_noise(pipe, generations, seed), self.scheduler)
        self.uncond = self.denoiser.empty()
        self.eps_u = self.param.to_epsilon(self.denoiser.shared_uncond(self.model_in, self.t), self.model_in, self.t)

    def _eps(self, embedding: Conditioning | torch.Tensor) -> torch.Tensor:
        e = as_conditioning(self.pipe, embedding).to(self.denoiser.dtype).expand(self.generations)
        return self.param.to_epsilon(self.denoiser.predict(self.model_in, self.t, e), self.model_in, self.t)

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
    cross-attention states: it conditions the UNet on the prompt too.
    """
    target_loss = ModelDefaults.of(pipe).resolve_target_loss(target_loss)
    check_settings(generations, target_loss, iters, lr)
    step = FirstStep(pipe, generations, seed, num_inference_steps)
    with torch.no_grad():
        cond = encode(pipe, [prompt]).to(torch.float32)
    bos = cond.prompt_embeds[:, :1]
    rest = cond.prompt_embeds[:, 1:].clone().requires_grad_(True)
    pooled = None if cond.pooled_embeds is None else cond.pooled_embeds.clone().requires_grad_(True)
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
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = current().map(lambda t: t.detach()).to(pipe.unet.dtype)
    return EmbeddingResult(final.prompt_embeds, losses, len(losses) - 1, losses[-1] <= target_loss, target_loss,
                           final)
