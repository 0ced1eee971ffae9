"""What the denoiser is conditioned on, for Stable Diffusion 1.x/2.x and SDXL alike.

Every scorer, explanation and mitigation in diffmem calls the UNet through one `Conditioning`: the cross-attention
states (`prompt_embeds`) and, for SDXL, the pooled text embedding and the micro-conditioning time ids that the
UNet takes as `added_cond_kwargs`. For SD `added_cond_kwargs` is None and the UNet call is exactly what it was
before SDXL existed. The empty prompt follows the pipeline's own convention: SDXL with
`force_zeros_for_empty_prompt` (the default) guides against all-zero embeddings, not against the encoded "".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffmem.errors import InputError


def is_sdxl(pipe: Any) -> bool:
    """Whether `pipe` has SDXL's second text encoder (and so pooled embeddings and time ids)."""
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of B rows: `prompt_embeds` (B, L, D) and, for SDXL, `pooled_embeds` (B, P) and
    `time_ids` (B, 6). Row operations apply to every tensor alike, so code written for SD serves SDXL."""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """SDXL's extra UNet inputs, or None for SD."""
        if self.pooled_embeds is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}  # type: ignore[dict-item]

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a `pipe.unet(sample, t, ...)` call for these rows."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with `fn` applied to each of its tensors (all have rows first)."""
        return Conditioning(fn(self.prompt_embeds), *(None if t is None else fn(t)
                                                     for t in (self.pooled_embeds, self.time_ids)))

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row n times in a row (prompt-major rows for n generations)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning as `rows` rows (a view, no copy)."""
        return self.map(lambda t: t.expand(rows, *t.shape[1:]))

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        """`Tensor.to` on every tensor; time ids keep their values (they are pixel sizes)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def replace(self, prompt_embeds: torch.Tensor | None = None,
                pooled_embeds: torch.Tensor | None = None) -> Conditioning:
        """The same rows with other embeddings (e.g. optimised ones); None keeps the current one."""
        return Conditioning(self.prompt_embeds if prompt_embeds is None else prompt_embeds,
                            self.pooled_embeds if pooled_embeds is None else pooled_embeds, self.time_ids)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of `parts`, one after the other (e.g. the empty prompt's, then the prompts')."""
        first = parts[0]
        pooled = None if first.pooled_embeds is None else torch.cat([p.pooled_embeds for p in parts])  # type: ignore
        time_ids = None if first.time_ids is None else torch.cat([p.time_ids for p in parts])  # type: ignore
        return Conditioning(torch.cat([p.prompt_embeds for p in parts]), pooled, time_ids)

    def pipe_kwargs(self, negative: Conditioning) -> dict[str, Any]:
        """The embedding arguments of a `pipe(...)` call that samples these rows against `negative`."""
        kwargs: dict[str, Any] = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": negative.prompt_embeds}
        if self.pooled_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_embeds
            kwargs["negative_pooled_prompt_embeds"] = negative.pooled_embeds
        return kwargs


def _tokens(tokenizer: Any, prompts: Sequence[str]) -> Any:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def time_ids(pipe: Any, rows: int) -> torch.Tensor:
    """SDXL's micro-conditioning at the pipeline's default size: (original size, crop (0, 0), target size)."""
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=pipe.unet.dtype, device=pipe.unet.device)
    return ids.expand(rows, -1)


def encode(pipe: Any, prompts: Sequence[str]) -> Conditioning:
    """The conditioning the pipeline feeds its UNet for each prompt (truncated to the text encoders).

    SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states side by side, the
    pooled projection of the second, and the default time ids, as `StableDiffusionXLPipeline.encode_prompt`.
    """
    dtype = pipe.unet.dtype
    if not is_sdxl(pipe):
        tok = _tokens(pipe.tokenizer, prompts)
        device = pipe.text_encoder.device
        mask = None
        if getattr(pipe.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        return Conditioning(pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(dtype))
    states = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(_tokens(tokenizer, prompts).input_ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the projection encoder's text_embeds (the last encoder's)
    assert pooled is not None
    embeds = torch.cat(states, dim=-1).to(pipe.unet.device, dtype)
    return Conditioning(embeds, pooled.to(pipe.unet.device, dtype), time_ids(pipe, len(prompts)))


def empty(pipe: Any) -> Conditioning:
    """The unconditional (empty-prompt) row the pipeline guides against: encoded "" for SD, and for SDXL with
    `force_zeros_for_empty_prompt` zeros in place of the embeddings (time ids unchanged)."""
    blank = encode(pipe, [""])
    if is_sdxl(pipe) and pipe.config.get("force_zeros_for_empty_prompt", True):
        assert blank.pooled_embeds is not None
        return blank.replace(torch.zeros_like(blank.prompt_embeds), torch.zeros_like(blank.pooled_embeds))
    return blank


def as_conditioning(pipe: Any, value: Conditioning | torch.Tensor) -> Conditioning:
    """`value` as a Conditioning: a bare cross-attention tensor is one only for SD (SDXL also needs pooled
    embeddings and time ids)."""
    if isinstance(value, Conditioning):
        return value
    if is_sdxl(pipe):
        raise InputError("an SDXL pipeline needs a Conditioning (diffmem.models.conditioning.encode), not a bare "
                         "tensor")
    return Conditioning(value)
