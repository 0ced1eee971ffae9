"""PRSS (Chen et al., CVPR 2025): semantic prompt search, then guidance re-anchored on the memorized prompt.

As the authors' code (github.com/chenchen-usyd/BE-PRSS, `local_sd_pipeline.py`: `aug_prompt_ss` and `__call__`,
README: `--l_target_ss 1 --l_target_pr 3 --mag_thres_pr 5`), per generation, with `m(p) = ||eps(x_T, p) -
eps(x_T, "")||` at the first step:

- semantic search: the prompt, then its paraphrases in file order; the first with `m <= search target` is sampled
  (the prompt itself: plain sampling, nothing re-anchored); if none is, the one of least `m`, re-anchored;
- re-anchoring: when the prompt itself was above the search target, at every step where the sampled paraphrase's
  `m_t = ||c - u||` exceeds the anchor target `l`, the prediction is `c_mem + s_pr (c - c_mem) + (s - s_pr)(c - u)`
  with `c_mem` the memorized prompt's conditional prediction, `s_pr = min(s (m_t - a)/(T - a), s)` and
  `a = (s l - T)/(s - 1)` (`s_pr` runs from 1 at `m_t = l` to `s` at the full-anchor magnitude `T`); else ordinary
  CFG. The extra prediction is made inside the pipeline call (`GuidanceEdit`), at steps that need it.

The paraphrases come from a file (`--paraphrases`: a JSON object, prompt -> list of paraphrases; the authors use
25 LLM paraphrases per prompt; `diffmem testbed mitigation` writes the testbed's from its caption grammar). The
authors' thresholds are SD v1.4's, on the scale of Wen et al.'s target loss 3: left out, they are 1/3, 1 and 5/3 of
the model's own target loss (exactly 1, 3 and 5 on SD v1.4). Choices: the search and the magnitudes are per
generation (the authors' norm spans the batch; they run one image per call), in the monitor's space.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmem.config import setting
from diffmem.errors import InputError
from diffmem.io.files import check_prompt_text, read_json_object
from diffmem.mitigate.base import Mitigation, NoOptions, Outcome, Sampler
from diffmem.mitigate.guidance import GuidanceEdit
from diffmem.models.conditioning import Conditioning, encode
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.registry import NOT_VERIFIED

SEARCH_SHARE, ANCHOR_SHARE, FULL_SHARE = 1 / 3, 1.0, 5 / 3
"""The authors' search target, anchor target and full-anchor magnitude (1, 3, 5) over Wen et al.'s SD v1.4 target
loss (3): the shares of the model's own target loss they default to."""
MAX_PARAPHRASES = 100
"""Most paraphrases read per prompt (the authors use 25)."""


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int]) -> dict[str, tuple[str, ...]]:
    shown = f"--paraphrases {path}"
    if stamp[0] == 0:
        raise InputError(f"{shown} is empty: it needs a JSON object mapping each prompt to a list of paraphrases")
    data = read_json_object(path, "paraphrase file")
    if not data:
        raise InputError(f"{shown} holds no prompts: it needs a JSON object mapping each prompt to a list of "
                         "paraphrases")
    out: dict[str, tuple[str, ...]] = {}
    for prompt, items in data.items():
        where = f"{shown}, paraphrases of {prompt[:40]!r}"
        if (not isinstance(items, list) or not items or len(items) > MAX_PARAPHRASES
                or not all(isinstance(t, str) for t in items)):
            raise InputError(f"{where}: must be a list of 1 to {MAX_PARAPHRASES} strings")
        texts = tuple(check_prompt_text(t, where) for t in items)
        if any(t is None for t in texts):
            raise InputError(f"{where}: a paraphrase is blank")
        out[prompt] = texts  # type: ignore[assignment]  # none is None
    return out


def read_paraphrases(path: str | Path) -> dict[str, tuple[str, ...]]:
    """The paraphrase file: a JSON object mapping each prompt to a non-empty list of paraphrases, checked (one
    line naming the file for an empty file, an empty object, or a value that is not a list of prompts)."""
    path = Path(path)
    try:
        info = path.stat()
        stamp = (info.st_size, info.st_mtime_ns)
    except OSError:
        stamp = (-1, 0)  # the reader says what is wrong
    return _read(str(path), stamp)


def check_coverage(prompts: Sequence[str], path: str | Path) -> None:
    """One line naming the first of `prompts` that the paraphrase file has no entry for."""
    table = read_paraphrases(path)
    for prompt in prompts:
        if prompt not in table:
            raise InputError(f"--paraphrases {path} has no entry for the prompt {prompt[:60]!r}")


@dataclass(frozen=True)
class PrssConfig(NoOptions):
    """PRSS's options: the paraphrase file and the three magnitudes (None: shares of the model's target loss)."""

    paraphrases: str | None = setting(None, option="--paraphrases")
    search_target: float | None = setting(None, option="--search-target", gt=0)
    anchor_target: float | None = setting(None, option="--anchor-target", gt=0)
    anchor_full: float | None = setting(None, option="--anchor-full", gt=0)

    def check(self) -> None:
        if self.paraphrases is None:
            raise InputError("prss needs --paraphrases FILE: a JSON object mapping each prompt to a list of "
                             "paraphrases")
        read_paraphrases(self.paraphrases)
        if self.anchor_target is not None and self.anchor_full is not None and self.anchor_full <= self.anchor_target:
            raise InputError(f"--anchor-full ({self.anchor_full:g}) must be above --anchor-target "
                             f"({self.anchor_target:g}): re-anchoring grows between the two")

    def resolved(self, defaults: ModelDefaults) -> PrssConfig:
        target = defaults.resolve_target_loss(None)
        return self.replace(
            search_target=self.search_target if self.search_target is not None else SEARCH_SHARE * target,
            anchor_target=self.anchor_target if self.anchor_target is not None else ANCHOR_SHARE * target,
            anchor_full=self.anchor_full if self.anchor_full is not None else FULL_SHARE * target)


@dataclass
class Search:
    """The semantic search of one prompt: per generation the candidate chosen (0: the prompt itself), its
    first-step magnitude, and whether guidance is re-anchored (the prompt itself was above the search target)."""

    chosen: list[int]
    magnitudes: list[float]
    reanchor: list[bool]


def search(magnitudes: torch.Tensor, target: float) -> Search:
    """The authors' search over candidates (rows: the prompt, then its paraphrases) for each generation
    (columns) of first-step magnitudes."""
    chosen, reanchor = [], []
    for column in magnitudes.T.tolist():
        below = [k for k, m in enumerate(column) if m <= target]
        chosen.append(below[0] if below else min(range(len(column)), key=column.__getitem__))
        reanchor.append(column[0] > target)
    return Search(chosen, [float(magnitudes[k, g]) for g, k in enumerate(chosen)], reanchor)


class ReAnchoring(GuidanceEdit):
    """The re-anchored combination, on the rows in `rows`, against the memorized prompt's conditioning `anchor`
    (one row per generation)."""

    def __init__(self, pipe: Any, guidance_scale: float, anchor: Conditioning, rows: list[bool], target: float,
                 full: float) -> None:
        super().__init__(pipe, guidance_scale)
        self.anchor, self.target, self.full = anchor, target, full
        self.rows = torch.tensor(rows)

    def conditional(self, pred_u: torch.Tensor, pred_c: torch.Tensor, sample: torch.Tensor, timestep: Any,
                    d: torch.Tensor) -> torch.Tensor:
        active = self.rows.to(d.device) & (d > self.target)
        if not bool(active.any()):  # one host copy per step, to skip the extra prediction when no row needs it
            return pred_c
        s, low, full = self.scale, self.target, self.full
        base = (s * low - full) / (s - 1)
        s_pr = ((d - base) / (full - base) * s).clamp(max=s).reshape(-1, *(1,) * (pred_c.dim() - 1))
        pred_m = self.predict(sample, timestep, self.anchor)
        wanted = pred_m + s_pr * (pred_c - pred_m) + (s - s_pr) * (pred_c - pred_u)
        rewritten = pred_u + (wanted - pred_u) / s
        return torch.where(active.reshape(-1, *(1,) * (pred_c.dim() - 1)), rewritten, pred_c)


class Prss(Mitigation):
    """PRSS: a paraphrase chosen per generation at the first step, sampled with guidance re-anchored on the
    memorized prompt."""

    name = "prss"
    Config = PrssConfig
    config: PrssConfig
    paper = "Chen et al., CVPR 2025"
    published = NOT_VERIFIED + ": Chen et al., CVPR 2025"
    cost = ("one CFG pair per paraphrase (first step), then a generation with one more conditional prediction at "
            "the steps it re-anchors")
    rank = 110
    needs = ("paraphrases",)

    def candidates(self, prompt: str) -> list[str]:
        """The prompt, then its paraphrases; a prompt the file lacks is an error."""
        assert self.config.paraphrases is not None  # checked
        check_coverage([prompt], self.config.paraphrases)
        return [prompt, *read_paraphrases(self.config.paraphrases)[prompt]]

    def prepare(self, prompts: Sequence[str]) -> None:
        assert self.config.paraphrases is not None  # checked
        check_coverage(prompts, self.config.paraphrases)

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        g, c = sampler.generation, self.config
        assert g.guidance_scale is not None and c.search_target is not None
        assert c.anchor_target is not None and c.anchor_full is not None  # resolved
        texts = self.candidates(prompt)
        n = sampler.noise.shape[0]
        denoiser = Denoiser(self.pipe)
        scheduler = denoiser.schedule(g.num_inference_steps)
        param, t = Parameterization.of(scheduler), scheduler.timesteps[0]
        with torch.no_grad():
            conds = encode(self.pipe, texts)
            x = denoiser.first_input(sampler.noise, scheduler)
            pred_c, pred_u, inputs = denoiser.cfg_shared(x, t, conds)
            diff = param.to_score(pred_c, inputs, t) - param.to_score(pred_u, inputs, t)
            found = search(diff.flatten(1).norm(dim=1).reshape(len(texts), n).double().cpu(), c.search_target)
        index = torch.tensor(found.chosen, device=conds.prompt_embeds.device)
        chosen = conds.map(lambda rows: rows[index])
        anchor = conds.map(lambda rows: rows[:1]).expand(n)
        with ReAnchoring(self.pipe, g.guidance_scale, anchor, found.reanchor, c.anchor_target, c.anchor_full):
            images, _ = sampler(**chosen.pipe_kwargs(sampler.uncond.expand(n)))
        sampled = [texts[k] for k in found.chosen]
        text = sampled[0] if len(set(sampled)) == 1 else " | ".join(sampled)
        return Outcome(images, sum(found.magnitudes) / n, text, details={
            "prss_prompts": sampled, "prss_magnitudes": found.magnitudes, "prss_reanchored": found.reanchor})
