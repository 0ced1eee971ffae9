"""Cross-attention maps and edits through diffusers attention processors, installed for one call and removed after.

`cross_attention(unet, hook)` replaces the processor of every cross-attention module with one that computes the
attention probabilities explicitly (`attn.scale * q k^T`, softmax, as diffusers' `AttnProcessor`), lets `hook` edit
the logits and observe the probabilities, and restores the original processors on exit, also after an exception.
Self-attention keeps its own processor. The pipeline is never forked: a plain `pipe(...)` or `pipe.unet(...)` call
inside the context is what is measured. Layers are numbered in forward order (down blocks, mid block, up blocks),
the order in which Ren et al. (ECCV 2024) index them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from diffmem.errors import InputError

_GROUPS = ("down_blocks", "mid_block", "up_blocks")


class AttentionHook:
    """What a `cross_attention` context does with each cross-attention call; the default changes nothing.

    `calls` counts the UNet forward calls since the context opened (a sampling step is one call with CFG batched),
    `call` is the index of the current one (0 at the first step).
    """

    def __init__(self) -> None:
        self.calls = 0

    @property
    def call(self) -> int:
        return self.calls - 1

    def edit(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """The logits (batch, heads, queries, tokens) softmax turns into attention; edit and return them."""
        return logits

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        """See the attention probabilities (batch, heads, queries, tokens) of cross-attention layer `layer`."""


def cross_attention_names(unet: Any) -> list[str]:
    """Processor names of the UNet's cross-attention modules, in forward order (down, mid, up)."""
    names = [name for name in unet.attn_processors
             if getattr(unet.get_submodule(name.removesuffix(".processor")), "is_cross_attention", False)]

    def rank(name: str) -> int:
        return next((i for i, g in enumerate(_GROUPS) if name.startswith(g)), len(_GROUPS))

    return sorted(names, key=rank)  # stable: keeps the module order within each group


class _CrossAttentionProcessor:
    """diffusers' `AttnProcessor` with the logits and probabilities handed to a hook (cross-attention only)."""

    def __init__(self, layer: int, original: Any, hook: AttentionHook) -> None:
        self.layer, self.original, self.hook = layer, original, hook

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        logits = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attention_mask
        if attn.upcast_softmax:
            logits = logits.float()
        shape = (batch, attn.heads, logits.shape[1], logits.shape[2])
        logits = self.hook.edit(self.layer, logits.view(shape)).reshape(-1, *shape[2:])
        probs = logits.softmax(dim=-1).to(dtype)
        self.hook.observe(self.layer, probs.view(shape))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def cross_attention(unet: Any, hook: AttentionHook, layers: Sequence[int] | None = None) -> Iterator[list[str]]:
    """Route the cross-attention layers `layers` (forward-order indices; None: all) through `hook` for the duration
    of the context; yields every cross-attention layer's name in forward order. The original processors are back in
    place when the context exits, however it exits."""
    names = cross_attention_names(unet)
    if not names:
        raise InputError("this UNet has no cross-attention layers: attention-based methods need a text-conditioned "
                         "UNet (Stable Diffusion 1.x/2.x or SDXL)")
    chosen = range(len(names)) if layers is None else layers
    for i in chosen:
        if not -len(names) <= i < len(names):
            raise InputError(f"cross-attention layer {i} does not exist: this UNet has {len(names)} "
                             f"(0..{len(names) - 1})")
    original = dict(unet.attn_processors)
    replaced = dict(original)
    for i in chosen:
        name = names[i]
        replaced[name] = _CrossAttentionProcessor(i % len(names), original[name], hook)

    def count(*_: Any) -> None:
        hook.calls += 1

    handle = unet.register_forward_pre_hook(count)
    unet.set_attn_processor(replaced)
    try:
        yield names
    finally:
        handle.remove()
        unet.set_attn_processor(dict(original))


def eos_positions(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Index of each prompt's end (EOS) token in its padded token sequence: BOS, the kept tokens, then EOS."""
    limit = tokenizer.model_max_length - 2
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [min(len(row), limit) + 1 for row in ids]


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`-sum p log p` over `dim` (0 log 0 = 0), in float64."""
    p = probs.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=dim)


class _RepeatedContextTokenProcessor:
    """SD3's joint attention (diffusers' `JointAttnProcessor2_0`) where the context's last token stands for
    `copies` identical tokens: adding log(copies) to its key's logits is exactly attention over the copies, and
    every other operation of an MMDiT block acts on each token alone, so the output is that of the long context."""

    def __init__(self, copies: int, context_rows: int | None = None) -> None:
        self.log_copies = math.log(copies)
        self.context_rows = context_rows

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        rows, width = hidden_states.shape[0], hidden_states.shape[1]
        collapsed = encoder_hidden_states is not None and (
            self.context_rows is None or encoder_hidden_states.shape[1] == self.context_rows)

        def heads(x: torch.Tensor, norm: Any) -> torch.Tensor:
            x = x.view(rows, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states), None)
        bias = None
        if encoder_hidden_states is not None:
            q = torch.cat([q, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
            if collapsed:
                bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
                bias[..., -1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * q.shape[-1]).to(q.dtype)
        hidden = attn.to_out[1](attn.to_out[0](out[:, :width]))
        if encoder_hidden_states is None:
            return hidden
        context = out[:, width:]
        return hidden, (context if attn.context_pre_only else attn.to_add_out(context))


@contextmanager
def repeated_context_token(transformer: Any, copies: int, context_rows: int | None = None) -> Iterator[None]:
    """Within the context, `transformer` (an SD3 MMDiT) reads the last token of its text context as `copies`
    identical tokens (SD3 without T5 feeds 256 rows of zeros: training on one is exact and several times
    cheaper); with `context_rows`, only a context of that many rows (any other is read as it is). Its processors
    are restored on exit."""
    original = transformer.attn_processors
    transformer.set_attn_processor(_RepeatedContextTokenProcessor(copies, context_rows))
    try:
        yield
    finally:
        transformer.set_attn_processor(original)


@contextmanager
def collapsed_t5_rows(pipe: Any) -> Iterator[bool]:
    """Within the context, an SD3 pipeline without T5 encodes its prompts with the 256 rows of zeros that stand
    for T5 as one row, and its transformer reads that row as all of them (`repeated_context_token`): the same
    predictions and images to float rounding, several times faster; embeddings given to it at full length are
    read as they are. Any other pipeline is left as it is (yields False). The testbed's evaluations use it."""
    from diffmem.models.families import SD3, call_default, family

    if family(pipe) != SD3 or pipe.text_encoder_3 is not None:
        yield False
        return
    copies = int(call_default(pipe, "max_sequence_length"))
    full, rows = pipe.tokenizer_max_length + copies, pipe.tokenizer_max_length + 1
    encode_prompt, shadowed = pipe.encode_prompt, vars(pipe).get("encode_prompt")

    @functools.wraps(encode_prompt)  # its signature, which the Monitor reads
    def collapsed(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("max_sequence_length", copies) != copies:
            raise ValueError(f"collapsed_t5_rows reads {copies} rows of zeros, not {kwargs['max_sequence_length']}")
        out = encode_prompt(*args, **kwargs)
        trimmed = [e[:, :rows] if e is not None and e.dim() == 3 and e.shape[1] == full else e for e in out[:2]]
        return (*trimmed, *out[2:])

    pipe.encode_prompt = collapsed
    try:
        with repeated_context_token(pipe.transformer, copies, rows):
            yield True
    finally:
        if shadowed is not None:
            pipe.encode_prompt = shadowed
        else:
            del pipe.encode_prompt
