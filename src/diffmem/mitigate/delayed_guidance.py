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

from dataclasses import dataclass

from diffmem.config import MAX_STEPS, setting
from diffmem.mitigate.base import Mitigation, NoOptions, Outcome, Sampler
from diffmem.mitigate.guidance import ScheduledGuidance
from diffmem.registry import NOT_VERIFIED

JAIN_EARLY = 1.0
"""The authors' scale before the transition: the conditional prediction alone."""
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
