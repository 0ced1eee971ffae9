"""Embedding optimisation to a looser target, then guidance delayed per generation: diffmem's default mitigation
(issue #32).

Wen et al.'s optimisation (`mitigate_embedding`) lowers the prompt's first-step score to a target; pushing it to
the model's own target (the held-out median) breaks most copies but costs alignment. Jain et al.'s delayed guidance
(`ScheduledGuidance`) samples the unconditional prediction until a transition and the full scale after it; alone it
keeps alignment but leaves many copies. Together each needs less: the optimisation stops at `target_slack` times the
model's target, and each generation starts guidance once its own `d_t` has fallen to the model's transition curve
(ordinary prompts' `d_t` on the same unguided path, `ModelDefaults.transition_curve`), not before timestep 800 and
at the latest at 680. A model without a curve starts guidance at 680 for every generation (the static rule).
Measured on testbed v2 in docs/results.md ("A default that meets the target").
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.config import MAX_STEPS, redefault, setting
from diffmem.errors import InputError
from diffmem.mitigate.base import Mitigation, Outcome, Sampler
from diffmem.mitigate.delayed_guidance import DelayedGuidanceConfig
from diffmem.mitigate.embedding import EmbeddingConfig, mitigate_embedding
from diffmem.mitigate.guidance import ScheduledGuidance
from diffmem.models.defaults import ModelDefaults

SLACK = 1.5
"""How far above the model's own target loss the optimisation may stop (testbed v2: 0.90 against 0.60)."""
EARLIEST = 800.0
"""The first timestep at which a generation may start guidance."""
LATEST = 680.0
"""The timestep by which every generation has started guidance (and at which all do without a curve)."""


@dataclass(frozen=True)
class EmbeddingDelayedConfig(EmbeddingConfig, DelayedGuidanceConfig):
    """The optimisation's options (it stops at `target_slack` x the target loss, the model's own unless given)
    and the guidance schedule's: unconditional until a generation's `d_t` meets the model's transition curve,
    from timestep `transition_timestep` on, and at the latest at `latest_timestep` (None: Jain et al.'s dynamic
    rule, the first local minimum of `d_t`)."""

    target_slack: float = setting(SLACK, option="--target-slack", ge=1, le=100,
                                  says="from 1 to 100 (times the model's own target loss)")
    early_guidance: float = redefault(DelayedGuidanceConfig, "early_guidance", 0.0)
    transition_timestep: float | None = redefault(DelayedGuidanceConfig, "transition_timestep", EARLIEST)
    latest_timestep: float = setting(LATEST, option="--latest-timestep", ge=0, le=MAX_STEPS)

    def check(self) -> None:
        super().check()
        if self.transition_timestep is not None and self.latest_timestep > self.transition_timestep:
            raise InputError(f"--latest-timestep {self.latest_timestep:g} is after --transition-timestep "
                             f"{self.transition_timestep:g} (timesteps fall): give one at or below it")

    def resolved(self, defaults: ModelDefaults) -> EmbeddingDelayedConfig:
        return self.replace(target_loss=defaults.resolve_target_loss(self.target_loss))

    @property
    def stop_at(self) -> float:
        """The first-step loss at which the optimisation stops."""
        assert self.target_loss is not None  # resolved
        return self.target_loss * self.target_slack

    def schedule(self, pipe, guidance_scale: float) -> ScheduledGuidance:
        """The guidance schedule these options give on `pipe`'s model: per generation from its transition curve,
        else every generation at `latest_timestep` (or the dynamic rule)."""
        defaults = ModelDefaults.of(pipe)
        if self.transition_timestep is None:
            return ScheduledGuidance(pipe, guidance_scale, self.early_guidance, None)
        if defaults.transition_curve is None:
            return ScheduledGuidance(pipe, guidance_scale, self.early_guidance, self.latest_timestep)
        return ScheduledGuidance(pipe, guidance_scale, self.early_guidance, self.transition_timestep,
                                 curve=defaults.transition_threshold, latest=self.latest_timestep)


class EmbeddingDelayed(Mitigation):
    """The prompt's conditioning optimised to the looser target, then sampled from the same noise with guidance
    from each generation's transition on."""

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
        with c.schedule(self.pipe, g.guidance_scale) as edit:
            images, _ = sampler(**res.conditioning.pipe_kwargs(sampler.uncond))
        return Outcome(images, res.final_loss, prompt, res.iters, res.reached,
                       details={"guidance_from_step": edit.switched_at})
