"""Inference-time mitigation baselines of Somepalli et al. 2023 (METHOD.md section 3), as pure seeded functions.

Text baselines insert words at random word positions of the prompt (`prompt.split()`, joined by single spaces):
random vocabulary tokens (RTA), random numbers (RNA) or the prompt's own words (CWR). GNI adds Gaussian noise to
the conditioning embedding. Same arguments and seed, same output.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffmem.config import setting
from diffmem.errors import InputError
from diffmem.mitigate.base import Mitigation, NoOptions, Outcome, Sampler, prompt_seed
from diffmem.models.conditioning import encode
from diffmem.registry import NOT_VERIFIED

MAX_NUMBER = 100_000
"""RNA draws integers in [0, MAX_NUMBER), as the reference implementations do."""
MAX_WORDS = 75
"""Most words a text baseline inserts: the text encoder reads 75 tokens, so more are cut off anyway."""
SOMEPALLI = "Somepalli et al. 2023"


@dataclass(frozen=True)
class TextEditConfig(NoOptions):
    """A text baseline's option: how many words it inserts."""

    k: int = setting(4, option="--k", ge=0, le=MAX_WORDS)


@dataclass(frozen=True)
class GniConfig(NoOptions):
    """GNI's option: the standard deviation of the noise added to the embedding."""

    sigma: float = setting(0.1, option="--sigma", ge=0, says="0 or more")


def _check_k(k: int) -> None:
    TextEditConfig(k=k)


def insert_words(prompt: str, new: Sequence[str], rng: random.Random) -> str:
    """`prompt` with each of `new` inserted in turn at a uniformly random word position (ends included)."""
    words = prompt.split()
    for word in new:
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def random_vocab_words(tokenizer, k: int, rng: random.Random) -> list[str]:
    """`k` random whole-word vocabulary tokens, decoded: special tokens, word pieces, byte fragments and anything
    that does not tokenize back to exactly that one token are skipped, so each inserted word adds one token."""
    special = set(tokenizer.all_special_ids)
    words: list[str] = []
    for _ in range(1000 * (k + 1)):
        if len(words) == k:
            return words
        token_id = rng.randrange(len(tokenizer))
        if token_id in special:
            continue
        word = tokenizer.decode([token_id]).strip()
        if (word.isprintable() and word and "\ufffd" not in word and " " not in word
                and tokenizer.tokenize(word) == [tokenizer.convert_ids_to_tokens(token_id)]):
            words.append(word)
    if len(words) < k:
        raise InputError("the tokenizer's vocabulary has too few whole-word tokens for random token addition")
    return words


def rta(prompt: str, tokenizer, k: int = 4, seed: int = 0) -> str:
    """Random token addition: insert `k` random vocabulary tokens of `tokenizer` at random word positions.

    With the bundled testbed's tokenizer:

        >>> from diffmem import load_pipeline
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> rta("a orange ring at the center on a gradient background", pipe.tokenizer, k=2, seed=0)
        'a orange ring at tio the center on word a gradient background'
    """
    _check_k(k)
    rng = random.Random(seed)
    return insert_words(prompt, random_vocab_words(tokenizer, k, rng), rng)


def rna(prompt: str, k: int = 4, seed: int = 0) -> str:
    """Random number addition: insert `k` random integers in [0, MAX_NUMBER) at random word positions.

    For example:

        >>> rna("a orange ring at the center on a gradient background", k=2, seed=0)
        '99346 a orange ring at the center 50494 on a gradient background'
    """
    _check_k(k)
    rng = random.Random(seed)
    return insert_words(prompt, [str(rng.randrange(MAX_NUMBER)) for _ in range(k)], rng)


def cwr(prompt: str, k: int = 4, seed: int = 0) -> str:
    """Caption word repetition: insert `k` words drawn (with replacement) from the prompt at random positions.

    For example:

        >>> cwr("a orange ring at the center on a gradient background", k=2, seed=0)
        'on a orange ring on at the center on a gradient background'
    """
    _check_k(k)
    words = prompt.split()
    if not words:
        return prompt
    rng = random.Random(seed)
    return insert_words(prompt, [rng.choice(words) for _ in range(k)], rng)


def gni(embedding: torch.Tensor, sigma: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Gaussian noise injection: `embedding + sigma * N(0, 1)` on every position but BOS (position 0).

    `embedding` is (B, L, D); each row gets its own noise, drawn on the CPU so results do not depend on the device.

        >>> import torch
        >>> from diffmem import load_pipeline
        >>> from diffmem.models.conditioning import encode
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> embedding = encode(pipe, ["a orange ring at the center on a gradient background"]).prompt_embeds.detach()
        >>> noisy = gni(embedding, sigma=0.1, seed=0)  # sample with pipe(prompt_embeds=noisy)
        >>> torch.equal(noisy[:, 0], embedding[:, 0]), round(float((noisy - embedding)[:, 1:].std()), 2)
        (True, 0.1)
    """
    GniConfig(sigma=sigma)
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(seed))
    noise[:, 0] = 0
    return (embedding.float() + sigma * noise.to(embedding.device)).to(embedding.dtype)


class TextEdit(Mitigation):
    """A text baseline: the prompt edited by `edit` (seeded per prompt, `prompt_seed`) is sampled instead."""

    Config = TextEditConfig
    config: TextEditConfig
    paper = SOMEPALLI
    published = NOT_VERIFIED + ": " + SOMEPALLI
    cost = "none (one generation of the edited prompt)"
    in_paper_table = True
    runs_on_flux = True
    edit: ClassVar[Any]
    """(prompt, tokenizer, k, seed) -> the edited prompt."""

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        text = type(self).edit(prompt, self.pipe.tokenizer, self.config.k, prompt_seed(sampler.generation.seed, prompt))
        images, final = sampler(prompt=text)
        return Outcome(images, final, text)


class RandomTokenAddition(TextEdit):
    """RTA: `k` random vocabulary tokens inserted."""

    name = "rta"
    rank = 20
    edit = staticmethod(rta)


class RandomNumberAddition(TextEdit):
    """RNA: `k` random numbers inserted."""

    name = "rna"
    rank = 30
    edit = staticmethod(lambda prompt, tokenizer, k, seed: rna(prompt, k, seed))


class CaptionWordRepetition(TextEdit):
    """CWR: `k` of the prompt's own words repeated."""

    name = "cwr"
    rank = 40
    edit = staticmethod(lambda prompt, tokenizer, k, seed: cwr(prompt, k, seed))


class GaussianNoiseInjection(Mitigation):
    """GNI: Gaussian noise added to the prompt's embedding (SDXL's pooled embedding stays)."""

    name = "gni"
    Config = GniConfig
    config: GniConfig
    paper = SOMEPALLI
    published = NOT_VERIFIED + ": " + SOMEPALLI
    cost = "none (one generation of the noisy embedding)"
    rank = 50
    in_paper_table = True

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        n = sampler.generation.generations
        with torch.no_grad():
            cond = encode(self.pipe, [prompt]).expand(n)
        noisy = cond.replace(gni(cond.prompt_embeds, self.config.sigma, prompt_seed(sampler.generation.seed, prompt)))
        images, final = sampler(**noisy.pipe_kwargs(sampler.uncond.expand(n)))
        return Outcome(images, final, prompt)
