"""Wen et al.'s detector (ICLR 2024; METHOD.md section 1): `d_t = || eps(x_t, prompt) - eps(x_t, "") ||_2` over
the whole latent, a prompt's score the mean of `d_t` over the chosen steps and generations. A rectified-flow model
(SD3, Flux) is scored on its velocity, `|| v(x_t, prompt) - v(x_t, "") ||_2`, which at the first step is the
difference of the predicted clean latents (METHOD.md section 8)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.config import setting
from diffmem.detectors.base import Detector, GuidedConfig, PromptScore, SteppedConfig
from diffmem.errors import InputError
from diffmem.models.conditioning import Conditioning, as_conditioning
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Parameterization


@dataclass(frozen=True)
class MagnitudeConfig(SteppedConfig, GuidedConfig):
    """Wen et al.'s settings: the scored steps and the guidance that steers the sampler between them (1 only for
    a guidance-distilled model, Flux: its true-CFG scale, 1 sampling the distilled model alone)."""

    guidance_scale: float | None = setting(None, option="--guidance", ge=1)

    def resolved(self, defaults: ModelDefaults) -> MagnitudeConfig:
        if self.guidance_scale == 1 and defaults.distilled_guidance is None:
            raise InputError("--guidance must be above 1 (classifier-free guidance), not 1")
        return self.replace(guidance_scale=defaults.resolve_guidance(self.guidance_scale))


class MagnitudeDetector(Detector):
    """Wen et al.'s detector: scores prompts by the text-conditional noise magnitude of the denoiser.

    A batch runs batch_size denoiser evaluations at the first step and 2 x batch_size at each later one.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> memorized, held_out = splits.planted[0].caption, splits.heldout[0].caption
        >>> scores = MagnitudeDetector(pipe, steps="first", generations=2).score([memorized, held_out])
        >>> [round(s.score, 2) for s in scores], [len(s.magnitudes) for s in scores]  # magnitudes[generation][step]
        ([0.78, 0.53], [2, 2])
    """

    name = "wen"
    Config = MagnitudeConfig
    config: MagnitudeConfig
    scores = "the leading --steps steps (default: the first)"
    cost = "1 conditional evaluation per prompt and generation at the first step, a CFG pair per later step"
    paper = "Wen et al., ICLR 2024"
    published = ("AUC 0.960, TPR@1% 0.760 (n=1; Wen et al., ICLR 2024); re-run by Jeon et al.: AUC 0.976 / 0.992, "
                 "TPR@1% 0.896 / 0.944 (n=1 / 4)")
    rank = 10

    @property
    def n_steps(self) -> int:
        """How many leading sampling steps are scored."""
        return self.config.n_steps

    @torch.no_grad()
    def magnitudes(self, cond: Conditioning | torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """`d_t` for conditioning rows `cond` (one per prompt; a bare tensor for SD) x generations: shape
        (prompts, generations, steps).

        At the first step every prompt starts from the same noise, so `eps(x_T, "")` of generation g is the
        same for all of them: it is computed once per detector and the denoiser runs on the conditional rows
        only, half a CFG batch. Later steps, where trajectories differ per prompt, run the full CFG batch.
        """
        denoiser, n, guidance = self.denoiser, self.config.generations, self.config.guidance_scale
        assert guidance is not None  # resolved from the model's defaults
        denoiser.check_steps(self.n_steps)
        cond = as_conditioning(self.pipe, cond)
        uncond = self._empty_embedding()
        rows = len(cond) * n
        scheduler = self._schedule()
        param = Parameterization.of(scheduler)
        first = self._first_input(scheduler)
        start = denoiser.start(self._initial_noise(), scheduler)
        latents = start.repeat(rows // n, *(1,) * (start.dim() - 1))
        out, timesteps = [], []
        for i, t in enumerate(scheduler.timesteps[: self.n_steps]):
            if i == 0:
                pred_c, pred_u, model_in = denoiser.cfg_shared(first, t, cond)
            else:
                model_in = denoiser.scale_input(latents, scheduler, t)
                pred_c, pred_u = denoiser.cfg(model_in, t, cond.repeat_interleave(n), uncond.expand(rows))
            # the prediction that carries the prompt: epsilon, or a flow model's velocity (METHOD.md, section 8)
            diff = param.to_score(pred_c, model_in, t) - param.to_score(pred_u, model_in, t)
            out.append(diff.flatten(1).norm(dim=1))
            timesteps.append(t)
            if len(out) < self.n_steps:
                guided = pred_u + guidance * (pred_c - pred_u)
                latents = denoiser.step(scheduler, guided, t, latents)
        mags = torch.stack(out, dim=1).reshape(-1, n, len(out))
        return mags, [float(t) for t in torch.stack(timesteps).cpu()]

    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        mags, timesteps = self.magnitudes(cond)
        return mags, timesteps, None

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        return mags.mean(dim=(1, 2))


def detect(pipe, prompts: Sequence[str], **settings) -> list[PromptScore]:
    """Score `prompts` with `MagnitudeDetector(pipe, **settings)`; the one-call entry point.

    A memorized (planted) and a held-out caption of the bundled testbed, scored over 3 steps:

        >>> from diffmem import detect, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()
        >>> memorized, held_out = detect(pipe, [splits.planted[0].caption, splits.heldout[0].caption], steps=3)
        >>> memorized.score > held_out.score, len(memorized.magnitudes[0]), memorized.n_tokens, memorized.truncated
        (True, 3, 10, False)
    """
    return MagnitudeDetector(pipe, **settings).score(prompts)
