"""Which words of a prompt drive memorization: token significance (METHOD.md section 2) and its checks.

`explain` returns an `Attribution` (tensors and numbers, no rendering); `diffmem.explanation.render` draws it.
The gradient method costs one forward and one backward pass of the denoiser per generation and step; the
leave-one-out method scores the prompt with each word deleted, all variants in one batch. Its settings are one
`ExplainConfig`, checked once (by `explain`, `diffmem explain` and the page alike).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from diffmem.config import SamplingConfig, setting
from diffmem.detectors.base import MAX_BATCH, Steps, parse_steps
from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.errors import InputError
from diffmem.io.files import check_prompt_text
from diffmem.models.conditioning import encode, prompt_positions, text_window
from diffmem.models.defaults import ModelDefaults
from diffmem.models.denoiser import Denoiser, Parameterization, initial_noise

METHODS = ("gradient", "leave-one-out")
MAX_EXPLAIN_WORDS = 256
"""Most whitespace-separated words of a prompt leave-one-out explains: it scores the prompt once with each word
deleted, one denoiser row per word and generation. 256 words cover the longest text window diffmem reads (T5's
512 tokens on Flux) at two tokens a word; CLIP models read 75 tokens, and words past a window score nothing."""


@dataclass(frozen=True)
class ExplainConfig(SamplingConfig):
    """What fixes an explanation: the method, the scored leading steps, the guidance between them (None: the
    model's own) and the sampling settings (generations, seed, schedule), checked once when built.

        >>> ExplainConfig(steps=3, num_inference_steps=2)
        Traceback (most recent call last):
        diffmem.errors.InputError: --steps 3 must be between 1 and num_inference_steps (2)
    """

    method: str = setting("leave-one-out", option="--method")
    steps: str | int = setting("first", option="--steps")
    guidance_scale: float | None = setting(None, option="--guidance", ge=1,
                                           says="1 or more (classifier-free guidance; 1 only for Flux)")

    def check(self) -> None:
        super().check()
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: --method must be one of {', '.join(METHODS)}")
        parse_steps(self.steps, self.num_inference_steps)

    @property
    def n_steps(self) -> int:
        """How many leading sampling steps the score averages."""
        return parse_steps(self.steps, self.num_inference_steps)

    def check_prompt(self, prompt: str) -> list[str]:
        """The prompt's whitespace words, or one InputError line: an empty prompt, or more words than leave-one-out
        explains (`MAX_EXPLAIN_WORDS`), or text the text rule refuses (`diffmem.io.files.check_prompt_text`: a
        non-string, a NUL or another control character, a lone surrogate, over 20,000 characters). Needs no model,
        so commands check it before loading one."""
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, not {type(prompt).__name__}")
        words = prompt.split() if check_prompt_text(prompt) is not None else []
        if not words:
            raise InputError("the prompt is empty: there is nothing to explain")
        if self.method == "leave-one-out" and len(words) > MAX_EXPLAIN_WORDS:
            raise InputError(f"the prompt has {len(words)} words; leave-one-out explains at most {MAX_EXPLAIN_WORDS} "
                             "(one denoiser row per word and generation): shorten it")
        return words

    def record(self, guidance_scale: float) -> dict[str, Any]:
        """The settings an `Attribution` records (what `suggest_edits` scores its edits with)."""
        return dict(steps=self.steps, generations=self.generations, seed=self.seed,
                    num_inference_steps=self.num_inference_steps, guidance_scale=guidance_scale)


@dataclass
class Word:
    """A whitespace-separated word of the prompt, its BPE token positions and its significance."""

    text: str
    tokens: list[int]
    significance: float
    truncated: bool = False


@dataclass
class Attribution:
    """Per-token and per-word significance of one prompt, with the score and the settings that produced them."""

    prompt: str
    method: str
    tokens: list[str]
    token_significance: torch.Tensor
    words: list[Word]
    score: float
    padding_significance: float | None
    settings: dict = field(default_factory=dict)
    cut_off: str = ""

    def ranking(self) -> list[int]:
        """Indices of the (untruncated) words, most significant first."""
        live = [i for i, w in enumerate(self.words) if not w.truncated]
        return sorted(live, key=lambda i: -self.words[i].significance)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "method": self.method,
            "score": self.score,
            "tokens": [{"text": t, "significance": float(s)} for t, s in zip(self.tokens, self.token_significance,
                                                                              strict=True)],
            "words": [{"text": w.text, "significance": w.significance, "truncated": w.truncated}
                      for w in self.words],
            "padding_significance": self.padding_significance,
            "cut_off": self.cut_off,
            "settings": self.settings,
        }


def split_words(tokenizer, prompt: str) -> tuple[list[str], list[list[str]]]:
    """Whitespace words and each word's BPE pieces; CLIP pre-tokenizes within words, so these concatenate
    to the prompt's own tokenization."""
    words = prompt.split()
    pieces = [tokenizer.tokenize(w) for w in words]
    return words, pieces


def _words(tokenizer, prompt: str, per_token: torch.Tensor,
           limit: int | None = None) -> tuple[list[Word], list[str], str]:
    """Group token significances into words; tokens past the encoder's `limit` (CLIP's 77 less BOS and EOS unless
    given) mark their words truncated."""
    limit = tokenizer.model_max_length - 2 if limit is None else limit
    words, pieces = split_words(tokenizer, prompt)
    out, tokens, pos, cut = [], [], 0, []
    for text, ps in zip(words, pieces, strict=True):
        idx = [p for p in range(pos, pos + len(ps)) if p < limit]
        truncated = len(idx) < len(ps)
        out.append(Word(text, idx, float(per_token[idx].sum()) if idx else 0.0, truncated))
        tokens.extend(ps[: len(idx)])
        if truncated:
            cut.append(text)
        pos += len(ps)
    return out, tokens, " ".join(cut)


def _finite(res) -> float:
    """A scored variant's score, or a clear error if the denoiser produced NaN/inf for it."""
    if res.score is None:
        raise InputError(f"{res.error} while scoring {res.prompt!r}")
    return float(res.score)


def gradient_significance(pipe, prompt: str, n_steps: int = 1, generations: int = 1, seed: int = 0,
                          num_inference_steps: int = 50, guidance_scale: float | None = None
                          ) -> tuple[torch.Tensor, float]:
    """`|| dL / d e_p[i] ||_2` for every conditioning position, and L (the detection score).

    L = mean over generations and the first `n_steps` steps of `d_t` (the text-conditional difference in the
    model's score space, `Parameterization.to_score`). Beyond the first step the sampled trajectory is held fixed
    (latents detached), so each step contributes its own gradient. The positions are those of `prompt_embeds`
    (`prompt_positions` says whose tokens sit where); pooled embeddings (SDXL, SD3, Flux) are held at the prompt's
    own.
    """
    denoiser = Denoiser(pipe)
    denoiser.check_steps(n_steps)
    guidance_scale = ModelDefaults.of(pipe).resolve_guidance(guidance_scale)
    with torch.no_grad():
        cond = encode(pipe, [prompt])
        uncond = denoiser.empty().expand(generations)
    e = cond.prompt_embeds.detach().float().requires_grad_(True)
    scheduler = denoiser.schedule(num_inference_steps)
    param = Parameterization.of(scheduler)
    latents = denoiser.start(initial_noise(pipe, generations, seed), scheduler)
    total = torch.zeros((), device=denoiser.device)
    for k, t in enumerate(scheduler.timesteps[:n_steps]):
        model_in = denoiser.scale_input(latents, scheduler, t)  # at k = 0 `Denoiser.first_input`, as detection's
        with torch.no_grad():  # the empty prompt's branch has no gradient: no graph, no backward through it
            pred_u = denoiser.predict(model_in, t, uncond)
        pred_c = denoiser.predict(model_in, t, cond.replace(e.to(denoiser.dtype)).expand(generations))
        s_u, s_c = param.to_score(pred_u, model_in, t), param.to_score(pred_c, model_in, t)
        total = total + (s_c - s_u).flatten(1).norm(dim=1).mean()
        if k + 1 < n_steps:
            with torch.no_grad():
                guided = pred_u + guidance_scale * (pred_c.detach() - pred_u)
                latents = denoiser.step(scheduler, guided, t, latents)
    loss = total / n_steps
    (grad,) = torch.autograd.grad(loss, e)
    return grad[0].float().norm(dim=-1).cpu(), float(loss.detach())


def explain(pipe, prompt: str, method: str | None = None, steps: Steps | None = None, generations: int | None = None,
            seed: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
            config: ExplainConfig | None = None) -> Attribution:
    """Significance of each token and word of `prompt` for its memorization score. Leave-one-out is the default:
    on the testbed its top word lowers the score 3.7x as much as a random word's deletion, the gradient's 1.6x
    (`diffmem testbed explain-eval`), at a cost of one batched scoring of the prompt's word deletions.

    The settings are `config` (default `ExplainConfig()`: leave-one-out, the first step, 1 generation, seed 0, 50
    sampling steps, the model's guidance) with the keyword settings given (not None) over it, checked once.

        >>> from diffmem import explain, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> attribution = explain(pipe, splits.planted[0].caption)  # its score with each word deleted in turn
        >>> [attribution.words[i].text for i in attribution.ranking()[:2]], round(attribution.score, 2)
        (['orange', 'center'], 0.77)
    """
    keywords: dict[str, Any] = dict(method=method, steps=steps, generations=generations, seed=seed,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    given = {name: value for name, value in keywords.items() if value is not None}
    config = ExplainConfig(**given) if config is None else config.replace(**given)
    config.check_prompt(prompt)
    method, steps, generations, seed = config.method, config.steps, config.generations, config.seed
    num_inference_steps, n_steps = config.num_inference_steps, config.n_steps
    guidance_scale = ModelDefaults.of(pipe).resolve_guidance(config.guidance_scale)
    settings = config.record(guidance_scale)
    tok, limit = text_window(pipe)  # SD3, PixArt, Flux: T5's tokens, the longest window the denoiser sees
    n_real = min(len(tok.tokenize(prompt)), limit)
    if method == "gradient":
        per_pos, score = gradient_significance(pipe, prompt, n_steps, generations, seed, num_inference_steps,
                                               guidance_scale)
        return _gradient_attribution(pipe, prompt, per_pos, score, settings)
    texts, pieces = split_words(tok, prompt)
    variants = [prompt] + [" ".join(texts[:i] + texts[i + 1 :]) for i in range(len(texts))]
    det = MagnitudeDetector(pipe, steps=steps, generations=generations, seed=seed,
                            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                            batch_size=min(MAX_BATCH, len(variants) * generations))
    scores = [_finite(r) for r in det.score(variants)]
    drops = [scores[0] - s for s in scores[1:]]
    per_token = torch.cat([torch.full((len(p),), d / len(p)) for p, d in zip(pieces, drops, strict=True)])
    word_objs, tokens, cut = _words(tok, prompt, per_token[:n_real], limit)
    for w, d in zip(word_objs, drops, strict=True):
        w.significance = 0.0 if w.truncated else d
    return Attribution(prompt, method, tokens, per_token[:n_real], word_objs, scores[0], None, settings, cut)


def _gradient_attribution(pipe, prompt: str, per_pos: torch.Tensor, score: float, settings: dict) -> Attribution:
    """Position gradients as token and word significances: each encoder's tokens read at their positions
    (`prompt_positions`); a word's significance sums its tokens' over the encoders (SD3: its CLIP and T5 tokens);
    the tokens shown are the text window's (`text_window`: T5's where the model has it); the rest is padding."""
    window, _ = text_window(pipe)
    prompt_token = torch.zeros(len(per_pos), dtype=torch.bool)
    totals = [0.0] * len(prompt.split())
    shown: tuple[list[Word], list[str], torch.Tensor, str] | None = None
    for tokenizer, first, limit in prompt_positions(pipe):
        n = min(len(tokenizer.tokenize(prompt)), limit)
        part = per_pos[first : first + n]
        prompt_token[first : first + n] = True
        words, tokens, cut = _words(tokenizer, prompt, part, limit)
        totals = [total + w.significance for total, w in zip(totals, words, strict=True)]
        if tokenizer is window:
            shown = (words, tokens, part, cut)
    assert shown is not None
    words, tokens, per_token, cut = shown
    words = [replace(w, significance=total) for w, total in zip(words, totals, strict=True)]
    return Attribution(prompt, "gradient", tokens, per_token, words, score, float(per_pos[~prompt_token].norm()),
                       settings, cut)


@dataclass
class Suggestion:
    """An edited prompt, what was changed and its detection score."""

    prompt: str
    change: str
    n_changed: int
    score: float


GENERIC_WORDS = ("thing", "object", "picture", "scene", "item", "shape")


def candidate_edits(attr: Attribution, top: int = 3, seed: int = 0) -> list[tuple[str, str, int]]:
    """Drop the top-1..top-k words, drop each of the top words alone, or replace one with a generic word."""
    words = [w.text for w in attr.words]
    ranked = attr.ranking()[:top]
    rng = random.Random(seed)
    edits = []
    for k in range(1, len(ranked) + 1):
        gone = set(ranked[:k])
        edits.append((" ".join(w for i, w in enumerate(words) if i not in gone),
                      "drop " + ", ".join(repr(words[i]) for i in ranked[:k]), k))
    for i in ranked[1:]:
        edits.append((" ".join(w for j, w in enumerate(words) if j != i), f"drop {words[i]!r}", 1))
    for i in ranked:
        new = rng.choice(GENERIC_WORDS)
        edits.append((" ".join(new if j == i else w for j, w in enumerate(words)), f"{words[i]!r} -> {new!r}", 1))
    seen, unique = set(), []
    for prompt, change, n in edits:
        if prompt.strip() and prompt not in seen and prompt != attr.prompt:
            seen.add(prompt)
            unique.append((prompt, change, n))
    return unique


def suggest_edits(pipe, attr: Attribution, threshold: float, top: int = 3, max_results: int = 5) -> list[Suggestion]:
    """Edited prompts scoring below `threshold`, scored in one batch; least change first, then lowest score.

    Edits of a memorized caption of the bundled testbed:

        >>> from diffmem import explain, suggest_edits, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> attribution = explain(pipe, splits.planted[0].caption)
        >>> suggestions = suggest_edits(pipe, attribution, threshold=0.6)  # about the held-out captions' median score
        >>> [(s.change, s.prompt) for s in suggestions[:2]]  # doctest: +NORMALIZE_WHITESPACE
        [("drop 'orange'", 'a ring at the center on a gradient background'),
         ("'orange' -> 'scene'", 'a scene ring at the center on a gradient background')]
    """
    edits = candidate_edits(attr, top=top, seed=attr.settings.get("seed", 0))
    if not edits:
        return []
    s = attr.settings
    gens = s.get("generations", 1)
    det = MagnitudeDetector(pipe, steps=s.get("steps", "first"), generations=gens, seed=s.get("seed", 0),
                            guidance_scale=s.get("guidance_scale"),
                            num_inference_steps=s.get("num_inference_steps", 50), batch_size=len(edits) * gens)
    scored = det.score([p for p, _, _ in edits])
    keep = [Suggestion(p, c, n, r.score) for (p, c, n), r in zip(edits, scored, strict=True)
            if r.score is not None and r.score < threshold]
    return sorted(keep, key=lambda x: (x.n_changed, x.score))[:max_results]
