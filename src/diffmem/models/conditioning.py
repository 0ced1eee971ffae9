"""What the denoiser is conditioned on, for Stable Diffusion 1.x/2.x, SDXL, SD3, PixArt, Flux and DeepFloyd IF alike.

Every scorer, explanation and mitigation in diffmem calls the UNet through one `Conditioning`: the cross-attention
states (`prompt_embeds`) and, for SDXL, the pooled text embedding and the micro-conditioning time ids that the
UNet takes as `added_cond_kwargs`. For SD `added_cond_kwargs` is None and the UNet call is exactly what it was
before SDXL existed. The empty prompt follows the pipeline's own convention: SDXL with
`force_zeros_for_empty_prompt` (the default) guides against all-zero embeddings, not against the encoded "".
The transformer families are encoded by their pipeline's own `encode_prompt` at its `__call__` defaults (sequence
length, caption cleaning): SD3's three encoders (CLIP pair side by side padded to T5's width, then T5's tokens)
and pooled CLIP projections; PixArt's T5 states and attention mask; Flux's T5 states and pooled CLIP; DeepFloyd IF's
T5 states (77 tokens). Their empty prompt is the encoded "", the negative prompt their pipelines guide against by
default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffmem.errors import InputError
from diffmem.models.families import DEEPFLOYD, FLUX, PIXART, SD3, UNET, call_default, family, network

IF_TOKENS = 77
"""The T5 sequence length of DeepFloyd IF's `encode_prompt` (fixed there; its `__call__` takes none)."""


def is_sdxl(pipe: Any) -> bool:
    """Whether `pipe` is a UNet with SDXL's second text encoder (and so pooled embeddings and time ids)."""
    return getattr(pipe, "text_encoder_2", None) is not None and family(pipe) == UNET


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of B rows: `prompt_embeds` (B, L, D) and, for SDXL, `pooled_embeds` (B, P) and
    `time_ids` (B, 6); SD3 and Flux have `pooled_embeds`, PixArt the T5 `attention_mask` (B, L). Row operations
    apply to every tensor alike, so code written for SD serves every family."""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

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
                                                     for t in (self.pooled_embeds, self.time_ids,
                                                               self.attention_mask)))

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row n times in a row (prompt-major rows for n generations)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning as `rows` rows (a view, no copy)."""
        return self.map(lambda t: t.expand(rows, *t.shape[1:]))

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        """`Tensor.to` on every tensor; time ids and the attention mask keep their values (pixel sizes, 0/1)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def replace(self, prompt_embeds: torch.Tensor | None = None,
                pooled_embeds: torch.Tensor | None = None) -> Conditioning:
        """The same rows with other embeddings (e.g. optimised ones); None keeps the current one."""
        return Conditioning(self.prompt_embeds if prompt_embeds is None else prompt_embeds,
                            self.pooled_embeds if pooled_embeds is None else pooled_embeds, self.time_ids,
                            self.attention_mask)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of `parts`, one after the other (e.g. the empty prompt's, then the prompts')."""
        first = parts[0]
        pooled = None if first.pooled_embeds is None else torch.cat([p.pooled_embeds for p in parts])  # type: ignore
        time_ids = None if first.time_ids is None else torch.cat([p.time_ids for p in parts])  # type: ignore
        mask = None if first.attention_mask is None else torch.cat([p.attention_mask for p in parts])  # type: ignore
        return Conditioning(torch.cat([p.prompt_embeds for p in parts]), pooled, time_ids, mask)

    def pipe_kwargs(self, negative: Conditioning) -> dict[str, Any]:
        """The embedding arguments of a `pipe(...)` call that samples these rows against `negative`."""
        kwargs: dict[str, Any] = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": negative.prompt_embeds}
        if self.pooled_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_embeds
            kwargs["negative_pooled_prompt_embeds"] = negative.pooled_embeds
        if self.attention_mask is not None:
            kwargs["prompt_attention_mask"] = self.attention_mask
            kwargs["negative_prompt_attention_mask"] = negative.attention_mask
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
    SD3, PixArt, Flux: their pipeline's `encode_prompt` (see the module docstring).
    """
    if family(pipe) != UNET:
        return _encode_transformer(pipe, prompts)
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


def _encode_transformer(pipe: Any, prompts: Sequence[str]) -> Conditioning:
    """`encode` for SD3, PixArt, Flux and DeepFloyd IF: the pipeline's own `encode_prompt` at its `__call__`
    defaults."""
    kind, net = family(pipe), network(pipe)
    texts = list(prompts)
    if kind == DEEPFLOYD:
        embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=net.device,
                                       clean_caption=_clean_caption(pipe))
        return Conditioning(embeds.to(net.dtype))
    length = call_default(pipe, "max_sequence_length")
    if kind == SD3:
        embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=net.device, clip_skip=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
        return Conditioning(embeds.to(net.dtype), pooled.to(net.dtype))
    if kind == PIXART:
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=net.device,
                                                clean_caption=_clean_caption(pipe), max_sequence_length=length)
        return Conditioning(embeds.to(net.dtype), attention_mask=mask)
    assert kind == FLUX
    embeds, pooled, _ = pipe.encode_prompt(texts, None, device=net.device, max_sequence_length=length)
    return Conditioning(embeds.to(net.dtype), pooled.to(net.dtype))


def _clean_caption(pipe: Any) -> bool:
    """PixArt's and IF's caption cleaning as a plain call does it: its default, off when bs4 or ftfy is missing."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return bool(call_default(pipe, "clean_caption")) and is_bs4_available() and is_ftfy_available()


def text_window(pipe: Any) -> tuple[Any, int]:
    """The tokenizer whose window bounds what a prompt can say (the longest one the pipeline feeds its denoiser)
    and how many of a prompt's own tokens it keeps: CLIP's 77 less BOS and EOS for the UNet family, the T5
    sequence length of the pipeline's `__call__` less EOS for SD3 (when it has T5), PixArt and Flux (IF: its fixed
    `IF_TOKENS`)."""
    kind = family(pipe)
    if kind == DEEPFLOYD:
        return pipe.tokenizer, IF_TOKENS - 1
    t5 = {SD3: "tokenizer_3", PIXART: "tokenizer", FLUX: "tokenizer_2"}.get(kind)
    tokenizer = getattr(pipe, t5, None) if t5 is not None else None
    if tokenizer is None or (kind == SD3 and pipe.text_encoder_3 is None):
        return pipe.tokenizer, pipe.tokenizer.model_max_length - 2
    return tokenizer, int(call_default(pipe, "max_sequence_length")) - 1


def prompt_positions(pipe: Any) -> list[tuple[Any, int, int]]:
    """Where each text encoder puts a prompt's tokens in `prompt_embeds`: (its tokenizer, the position of the
    prompt's first token, how many of its tokens it keeps). CLIP's follow its BOS (the UNet family, and SD3's two
    CLIP encoders side by side in the first `tokenizer_max_length` positions); T5's start at 0 after SD3's CLIP
    positions, or alone (PixArt, Flux: Flux's CLIP gives only the pooled embedding; DeepFloyd IF)."""
    kind = family(pipe)
    if kind == DEEPFLOYD:
        return [(pipe.tokenizer, 0, IF_TOKENS - 1)]
    clip = (pipe.tokenizer, 1, pipe.tokenizer.model_max_length - 2)
    if kind == UNET:
        return [clip]
    length = int(call_default(pipe, "max_sequence_length"))
    if kind == SD3:
        t5 = [] if pipe.text_encoder_3 is None else [(pipe.tokenizer_3, pipe.tokenizer_max_length, length - 1)]
        return [clip, *t5]
    return [(pipe.tokenizer if kind == PIXART else pipe.tokenizer_2, 0, length - 1)]


def prompt_mask(pipe: Any, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Which entries of one row of `prompt_embeds` (positions x width, bool) a text encoder writes: all of them but
    SD3's zero padding, the columns past its two CLIP encoders' widths in the CLIP positions and, without T5, every
    T5 position. Training only ever saw zeros there, so what optimises a prompt's states leaves them."""
    mask = torch.ones(prompt_embeds.shape[-2:], dtype=torch.bool, device=prompt_embeds.device)
    if family(pipe) == SD3:
        clip = pipe.tokenizer_max_length
        mask[:clip, pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size:] = False
        mask[clip:] = pipe.text_encoder_3 is not None
    return mask


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
    embeddings and time ids; SD3 and Flux pooled embeddings; PixArt its attention mask)."""
    if isinstance(value, Conditioning):
        return value
    if is_sdxl(pipe) or family(pipe) != UNET:
        raise InputError(f"a {type(pipe).__name__} needs a Conditioning (diffmem.models.conditioning.encode), not "
                         "a bare tensor")
    return Conditioning(value)
