"""Jain et al. (CVPR 2025, "attraction basin"): classifier-free guidance only after a transition point.

A memorized prompt pulls the trajectory into an attraction basin while guidance is on; outside it, guidance is
harmless. The authors (github.com/SonyResearch/mitigating_memorization, commit c6e813c) sample with guidance 1 (the
conditional prediction alone) until the transition and the full scale from it on. Dynamic transition (their
default, `generate_test_dataset_dtp.py`): the first local minimum of `d_t = ||eps_c - eps_u||`, i.e. the first step
where `d_t > d_(t-1)` and `d_(t-2) > d_(t-1)` (that step at full guidance); static transition
(`generate_test_dataset_stp.py`): the first timestep <= `--transition-timestep` (500 to 700 of 1000 in their runs);
opposite guidance: a negative scale before it. Zero overhead: the rule reads the CFG batch the pipeline computes
anyway (`ScheduledGuidance`). Choices: `d_t` per generation (the authors take the norm over the whole batch, which
makes one image depend on the others), in the monitor's space (epsilon; the authors read the raw prediction of
epsilon models), with the run's scheduler (the authors': DPM-Solver multistep, 50 steps) and guidance scale (7.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.config import MAX_STEPS, setting
from diffmem.mitigate.base import GenerationConfig, Mitigation, NoOptions, Outcome, Sampler
from diffmem.mitigate.guidance import ScheduledGuidance
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import initial_noise
from diffmem.models.families import network
from diffmem.registry import NOT_VERIFIED

JAIN_EARLY = 1.0
"""The authors' scale before the transition: the conditional prediction alone."""
TRANSITION_QUANTILE = 0.4
"""The share of ordinary prompts' `d_t` a generation must fall to before guidance starts (`transition_curve`):
chosen on testbed v2 (docs/results.md, "A default that meets the target")."""
MOST_OPPOSITE = -10.0
"""The most negative scale before the transition (opposite guidance; the authors use -2 and minus the scale)."""


@dataclass(frozen=True)
class DelayedGuidanceConfig(NoOptions):
    """Jain et al.'s options: the scale before the transition, and the transition timestep (None: the first local
    minimum of `d_t`, the dynamic rule)."""

    early_guidance: float = setting(JAIN_EARLY, option="--early-guidance", ge=MOST_OPPOSITE, le=1,
                                    says=f"from {MOST_OPPOSITE:g} to 1 (1: the conditional prediction alone, 0: "
                                         "the unconditional one, negative: opposite guidance)")
    transition_timestep: float | None = setting(None, option="--transition-timestep", ge=0, le=MAX_STEPS)


class DelayedGuidance(Mitigation):
    """Guidance `--early-guidance` until the transition, then the run's own scale; same prompt, same noise."""

    name = "delayed-guidance"
    Config = DelayedGuidanceConfig
    config: DelayedGuidanceConfig
    paper = "Jain et al., CVPR 2025"
    published = NOT_VERIFIED + ": Jain et al., CVPR 2025"
    cost = "none (one generation; the rule reads the CFG batch it computes anyway)"
    rank = 90

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g, c = sampler.generation, self.config
        assert g.guidance_scale is not None  # resolved
        with ScheduledGuidance(self.pipe, g.guidance_scale, c.early_guidance, c.transition_timestep) as edit:
            images, _ = sampler(prompt=prompt)
        return Outcome(images, edit.first_score, prompt, details={"guidance_from_step": edit.switched_at})


def transition_curve(pipe, prompts: Sequence[str], *, generations: int = 4, seed: int = 0,
                     num_inference_steps: int = 50,
                     quantile: float = TRANSITION_QUANTILE) -> tuple[tuple[float, float], ...]:
    """A model's transition curve (`ModelDefaults.transition_curve`): at each timestep of an unguided generation
    (the unconditional prediction alone, from the run's initial noises), the `quantile` of ordinary `prompts`' `d_t`
    over every prompt and generation. Calibrate it on prompts the model did not memorize.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> ordinary = [item.caption for item in shipped_recipe().splits().heldout[128:130]]
        >>> curve = transition_curve(pipe, ordinary, num_inference_steps=10)
        >>> len(curve), curve[0][0], curve[-1][0]  # one point per step, timesteps falling
        (10, 901.0, 1.0)
    """
    if not prompts or not 0 <= quantile <= 1:
        raise ValueError("a transition curve needs prompts and a quantile from 0 to 1")
    generation = GenerationConfig(generations=generations, seed=seed, num_inference_steps=num_inference_steps,
                                  output_type="latent").resolved(ModelDefaults.of(pipe))
    assert generation.guidance_scale is not None  # resolved
    net = network(pipe)
    sampler = Sampler(pipe, generation, initial_noise(pipe, generations, seed).to(net.device, net.dtype))
    traces = []
    for prompt in prompts:
        with torch.no_grad(), ScheduledGuidance(pipe, generation.guidance_scale, 0.0, -1.0) as edit:  # never on
            sampler(prompt=prompt)
        traces.append(torch.stack([d.double() for _, d in edit.trace]))
    steps = [t for t, _ in edit.trace]
    values = np.quantile(torch.cat(traces, dim=1).numpy(), quantile, axis=1)
    return tuple((float(t), float(v)) for t, v in zip(steps, values, strict=True))
