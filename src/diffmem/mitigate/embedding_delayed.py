"""Embedding optimisation to a looser target, then guidance delayed: diffmem's candidate default (issue #32).

Wen et al.'s optimisation (`mitigate_embedding`) lowers the prompt's first-step score to a target; pushing it to
the model's own target (the held-out median) breaks most copies but costs alignment. Jain et al.'s delayed guidance
(`ScheduledGuidance`, static rule) samples the unconditional prediction until a transition timestep and the full
scale after it; alone it keeps alignment but leaves many copies. Together each needs less: the optimisation stops
at `target_slack` times the model's target (an ordinary prompt's score, not a median one), and guidance starts at
timestep 800 of 1000, the first 10 of 50 steps unguided. Measured on testbed v2 in docs/results.md
("Mitigation frontier").
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.config import redefault, setting
from diffmem.mitigate.base import Mitigation, Outcome, Sampler
from diffmem.mitigate.delayed_guidance import DelayedGuidanceConfig
from diffmem.mitigate.embedding import EmbeddingConfig, mitigate_embedding
from diffmem.mitigate.guidance import ScheduledGuidance
from diffmem.models.defaults import ModelDefaults

SLACK = 1.25
"""How far above the model's own target loss the optimisation may stop (testbed v2: 0.75 against 0.60, the
held-out scores' 90th percentile against their median)."""


@dataclass(frozen=True)
class EmbeddingDelayedConfig(EmbeddingConfig, DelayedGuidanceConfig):
    """The optimisation's options (it stops at `target_slack` x the target loss, the model's own unless given)
    and the guidance schedule's (unconditional until timestep 800)."""

    target_slack: float = setting(SLACK, option="--target-slack", ge=1, le=100,
                                  says="from 1 to 100 (times the model's own target loss)")
    early_guidance: float = redefault(DelayedGuidanceConfig, "early_guidance", 0.0)
    transition_timestep: float | None = redefault(DelayedGuidanceConfig, "transition_timestep", 800.0)

    def resolved(self, defaults: ModelDefaults) -> EmbeddingDelayedConfig:
        return self.replace(target_loss=defaults.resolve_target_loss(self.target_loss))

    @property
    def stop_at(self) -> float:
        """The first-step loss at which the optimisation stops."""
        assert self.target_loss is not None  # resolved
        return self.target_loss * self.target_slack


class EmbeddingDelayed(Mitigation):
    """The prompt's conditioning optimised to the looser target, then sampled from the same noise with guidance
    from the transition on."""

    name = "embedding-delayed"
    Config = EmbeddingDelayedConfig
    config: EmbeddingDelayedConfig
    paper = "diffmem: Wen et al., ICLR 2024 with Jain et al., CVPR 2025"
    published = "none (diffmem's combination)"
    cost = "at most --iters forward + backward passes over the generations (fewer: a looser target), then a generation"
    rank = 120

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g, c = sampler.generation, self.config
        assert g.guidance_scale is not None  # resolved
        res = mitigate_embedding(self.pipe, prompt, generations=g.generations, seed=g.seed,
                                 target_loss=c.stop_at, iters=c.iters, lr=c.lr,
                                 num_inference_steps=g.num_inference_steps)
        assert res.conditioning is not None
        with ScheduledGuidance(self.pipe, g.guidance_scale, c.early_guidance, c.transition_timestep) as edit:
            images, _ = sampler(**res.conditioning.pipe_kwargs(sampler.uncond))
        return Outcome(images, res.final_loss, prompt, res.iters, res.reached,
                       details={"guidance_from_step": edit.switched_at})
