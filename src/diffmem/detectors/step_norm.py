"""The step-norm score (Huang et al., "Broken Memories", KDD 2026): memorization makes the sampler numerically
unstable, so a memorized generation's latent updates leave the range they keep for ordinary prompts.

The `Monitor` reads `u_k = ||x_(k+1) - x_k||_2`, the update of each step but the last, during an ordinary guided
generation (no extra denoiser call). A `StableRange` holds, per step, the band `[lo_k, hi_k]` of the updates of
non-memorized prompts (by default their 1st and 99th percentiles: our choice, the paper's exact band was not at
hand). A generation's score is its largest excursion outside the band, `max_k max(u_k - hi_k, lo_k - u_k) /
(hi_k - lo_k)` (negative inside the band, above 0 once a step leaves it), and a prompt's the mean over its
generations. Without a range the score is the largest update norm itself, a rough stand-in: fit a range on
prompts known not to be memorized (`StableRange.fit`) for the authors' criterion.
Result rows keep the raw update norms in `magnitudes` (so that a range can be fit on them later) and each
generation's score in `terms`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffmem.config import setting
from diffmem.detectors.base import GuidedConfig
from diffmem.detectors.trajectory import TrajectoryDetector
from diffmem.errors import InputError
from diffmem.io.durable import replace_file
from diffmem.io.files import read_json_object
from diffmem.models.conditioning import Conditioning


@dataclass(frozen=True)
class StableRange:
    """Per-step band `[lo[k], hi[k]]` of ordinary latent update norms."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    @classmethod
    def fit(cls, updates: torch.Tensor | Sequence[Sequence[float]], quantiles: tuple[float, float] = (0.01, 0.99)
            ) -> StableRange:
        """The band of `updates` (rows, steps): per step, the two quantiles over the rows."""
        values = torch.as_tensor(updates, dtype=torch.float64)
        if values.ndim != 2 or values.shape[0] < 2:
            raise InputError("a stable range needs the update norms of at least two generations")
        q = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64), dim=0)
        return cls(tuple(q[0].tolist()), tuple(q[1].tolist()))

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], **kwargs: Any) -> StableRange:
        """The band of the update norms in `diffmem detect --detector step-norm` result rows."""
        updates = [g for row in rows if row.get("score") is not None for g in row["magnitudes"]]
        return cls.fit(updates, **kwargs)

    def excursion(self, updates: torch.Tensor) -> torch.Tensor:
        """Largest normalised distance outside the band over the steps of each row of `updates` (rows, steps)."""
        if updates.shape[-1] != len(self.lo):
            raise InputError(f"the stable range has {len(self.lo)} steps, the generation {updates.shape[-1]}: fit it "
                             "with the same --num-inference-steps")
        lo = torch.tensor(self.lo, dtype=updates.dtype)
        hi = torch.tensor(self.hi, dtype=updates.dtype)
        width = (hi - lo).clamp_min(1e-12)
        return torch.maximum(updates - hi, lo - updates).div(width).amax(dim=-1)

    def scores(self, rows: Sequence[dict[str, Any]]) -> list[float | None]:
        """Step-norm scores of `diffmem detect` result rows against this range, from their stored update norms."""
        return [None if row["score"] is None else
                float(self.excursion(torch.tensor(row["magnitudes"], dtype=torch.float64)).mean()) for row in rows]

    def save(self, path: Path) -> None:
        replace_file(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> StableRange:
        try:
            data = read_json_object(path, "stable range file")
        except InputError as exc:  # missing, unreadable, not a file: the reason, after what was expected
            raise InputError(f"{path} is not a stable range file ({exc})") from None
        try:
            return cls(tuple(map(float, data["lo"])), tuple(map(float, data["hi"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a stable range file ({exc})") from None


@dataclass(frozen=True)
class StepNormConfig(GuidedConfig):
    """The step-norm score's settings: a guided generation of at least 2 steps and an optional stable range."""

    stable_range: StableRange | None = setting(None, option="--stable-range")

    def check(self) -> None:
        super().check()
        if self.num_inference_steps < 2:
            raise InputError("step-norm needs at least 2 sampling steps (it measures the updates between them)")
        if self.stable_range is not None and not isinstance(self.stable_range, StableRange):
            raise InputError(f"--stable-range must be a stable range, not {type(self.stable_range).__name__}")


class StepNormDetector(TrajectoryDetector):
    """Huang et al.'s step-norm score, read by the `Monitor` during an ordinary generation.

    A band fitted on held-out prompts' update norms turns the score into the authors' excursion (above 0: outside):

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> reference = StepNormDetector(pipe, num_inference_steps=10).score([i.caption for i in splits.heldout[8:16]])
        >>> band = StableRange.from_rows([row.to_dict() for row in reference])  # 9 steps: the updates between 10
        >>> detector = StepNormDetector(pipe, stable_range=band, num_inference_steps=10)
        >>> [round(row.score, 2) for row in detector.score([splits.planted[0].caption, splits.heldout[0].caption])]
        [0.5, 0.17]
    """

    name = "step-norm"
    Config = StepNormConfig
    config: StepNormConfig
    paper = "Huang et al., KDD 2026, arXiv 2605.22050"
    published = "AUC > 0.999 (Huang et al., KDD 2026, arXiv 2605.22050, abstract)"
    rank = 80
    min_references = 4
    note = ("stable range fit on the even-indexed non-memorized prompts (step_norm_range.json), evaluated on the "
            "odd-indexed ones")

    @classmethod
    def split_scores(cls, memorized: list[dict[str, Any]], normal: list[dict[str, Any]], out: Path
                     ) -> tuple[list[float | None], list[float | None], list[dict[str, Any]]]:
        """The stable range is fit on the even-indexed non-memorized rows (saved as OUT/step_norm_range.json, for
        `diffmem detect --stable-range`) and the scores of the others and of the memorized rows are measured
        against it."""
        band = StableRange.from_rows(normal[0::2])
        band.save(out / "step_norm_range.json")
        held = normal[1::2]
        return band.scores(memorized), band.scores(held), held

    @torch.no_grad()
    def _measure(self, cond: Conditioning) -> tuple[torch.Tensor, list[float], torch.Tensor | None]:
        _, monitor = self._generate(cond)
        updates = monitor.update_norms()
        terms = updates.amax(dim=1) if self.config.stable_range is None else self.config.stable_range.excursion(updates)
        return self._per_prompt(updates), monitor.timesteps()[:-1], self._per_prompt(terms)

    def _combine(self, mags: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
        assert terms is not None
        return terms.mean(dim=1)
