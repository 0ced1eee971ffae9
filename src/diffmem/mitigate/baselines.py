"""Inference-time mitigation baselines of Somepalli et al. 2023 (METHOD.md section 3), as pure seeded functions.

Text baselines insert words at random word positions of the prompt (`prompt.split()`, joined by single spaces):
random vocabulary tokens (RTA), random numbers (RNA) or the prompt's own words (CWR). GNI adds Gaussian noise to
the conditioning embedding. Same arguments and seed, same output.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from diffmem.errors import InputError

MAX_NUMBER = 100_000
"""RNA draws integers in [0, MAX_NUMBER), as the reference implementations do."""


def _check_k(k: int) -> None:
    if k < 0:
        raise InputError(f"--k must be 0 or more, not {k}")


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
    """Random token addition: insert `k` random vocabulary tokens of `tokenizer` at random word positions."""
    _check_k(k)
    rng = random.Random(seed)
    return insert_words(prompt, random_vocab_words(tokenizer, k, rng), rng)


def rna(prompt: str, k: int = 4, seed: int = 0) -> str:
    """Random number addition: insert `k` random integers in [0, MAX_NUMBER) at random word positions."""
    _check_k(k)
    rng = random.Random(seed)
    return insert_words(prompt, [str(rng.randrange(MAX_NUMBER)) for _ in range(k)], rng)


def cwr(prompt: str, k: int = 4, seed: int = 0) -> str:
    """Caption word repetition: insert `k` words drawn (with replacement) from the prompt at random positions."""
    _check_k(k)
    words = prompt.split()
    if not words:
        return prompt
    rng = random.Random(seed)
    return insert_words(prompt, [rng.choice(words) for _ in range(k)], rng)


def gni(embedding: torch.Tensor, sigma: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Gaussian noise injection: `embedding + sigma * N(0, 1)` on every position but BOS (position 0).

    `embedding` is (B, L, D); each row gets its own noise, drawn on the CPU so results do not depend on the device.
    """
    if not sigma >= 0:
        raise InputError(f"--sigma must be 0 or more, not {sigma}")
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(seed))
    noise[:, 0] = 0
    return (embedding.float() + sigma * noise.to(embedding.device)).to(embedding.dtype)
