"""Guidance changed per step inside one ordinary pipeline call, at no extra denoiser cost (METHOD.md section 3).

The pipeline combines its CFG batch as `u + s (c - u)` with its own scale `s`. A forward hook on the denoiser
(`GuidanceEdit`) replaces the conditional half `c` by `c'` so that this same combination gives the prediction a
method wants: for a per-step scale `s'`, `c' = u + (s'/s)(c - u)` gives `u + s'(c - u)` (`s' = 1`: the conditional
prediction alone; `0`: the unconditional one; negative: opposite guidance). Rows keep `c` bit for bit where
`s' = s`. The hook reads `d_t = ||c - u||` per generation (in the monitor's space: epsilon, or a flow model's
velocity) as it goes, so a rule may decide from the trajectory itself (`ScheduledGuidance`). Families whose
pipelines batch both branches (SD 1.x/2.x, SDXL, SD3, PixArt) are supported; Flux runs true CFG as two calls and is
refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch

from diffmem.errors import InputError
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.models.families import FLUX, family, network


class GuidanceEdit:
    """Rewrite the conditional half of every CFG batch of the pipeline calls made while it is entered; subclasses
    say how (`conditional`). `first` holds the first call's `d_t` per generation (the first-step score of what is
    sampled), `trace` each call's scheduler timestep and `d_t`, and `calls` the CFG calls seen."""

    def __init__(self, pipe: Any, guidance_scale: float) -> None:
        if family(pipe) == FLUX:
            raise InputError("this mitigation rewrites the CFG batch; Flux computes its branches in two calls: use "
                             "an SD, SDXL, SD3 or PixArt model")
        self.pipe, self.scale = pipe, float(guidance_scale)
        self.denoiser = Denoiser(pipe)
        self.first: torch.Tensor | None = None
        self.trace: list[tuple[float, torch.Tensor]] = []
        self.calls = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._busy = False

    def __enter__(self) -> Self:
        self._handle = network(self.pipe).register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def conditional(self, pred_u: torch.Tensor, pred_c: torch.Tensor, sample: torch.Tensor, timestep: Any,
                    d: torch.Tensor) -> torch.Tensor:
        """The conditional rows to put in the batch, given the predictions (float32, the network's own
        parameterization), their latents, the network's timestep argument and `d_t` per row."""
        raise NotImplementedError

    def reweighted(self, pred_u: torch.Tensor, pred_c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The conditional rows that make the pipeline's combination `u + scale (c - u)` (one scale per row);
        rows at the pipeline's own scale keep `c` exactly."""
        ratio = (scale / self.scale).to(pred_c.dtype).reshape(-1, *(1,) * (pred_c.dim() - 1))
        return torch.where(ratio == 1, pred_c, pred_u + ratio * (pred_c - pred_u))

    def predict(self, sample: torch.Tensor, timestep: Any, cond: Any) -> torch.Tensor:
        """An extra prediction from inside the hook, in the network's parameterization; the network's forward hooks
        (this one, the sampler's monitor) are set aside for it, so none of them sees it as a step."""
        step = torch.as_tensor(timestep).reshape(-1)[0]  # SD3 and PixArt pass one timestep per row
        hooks = network(self.pipe)._forward_hooks
        kept = dict(hooks)
        hooks.clear()
        self._busy = True
        try:
            return self.denoiser.predict(sample, step, cond).float()
        finally:
            self._busy = False
            hooks.update(kept)

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._busy or kwargs.get("skip_layers") is not None:
            return None
        raw = output[0] if isinstance(output, tuple) else output.sample
        if raw.shape[0] % 2:
            return None  # no CFG batch
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        assert sample is not None  # every family passes its latents
        net_t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = self.denoiser.scheduler_timestep(net_t)
        with torch.no_grad():
            pred_u, pred_c = self.denoiser.prediction(raw).float().chunk(2)
            latents = sample.chunk(2)[1]
            param = Parameterization.of(self.pipe.scheduler)  # the running call's scheduler
            d = (param.to_score(pred_c, latents, t) - param.to_score(pred_u, latents, t)).flatten(1).norm(dim=1)
            if self.first is None:
                self.first = d
            self.trace.append((float(torch.as_tensor(t).reshape(-1)[0]), d))
            cond = self.conditional(pred_u, pred_c, latents, net_t, d)
            self.calls += 1
            new = raw.clone()
            new[raw.shape[0] // 2 :, : cond.shape[1]] = cond.to(raw.dtype)  # PixArt: its variance channels stay
        return (new, *output[1:]) if isinstance(output, tuple) else type(output)(sample=new)

    @property
    def first_score(self) -> float:
        """The mean first-step `d_t` over the generations (nan before any call)."""
        return float("nan") if self.first is None else float(self.first.double().mean())


class ScheduledGuidance(GuidanceEdit):
    """Guidance `early` until a transition, then the pipeline's own scale, per generation. The transition is the
    first call whose timestep is <= `boundary` (Jain et al.'s static rule: early while `t > boundary`), or, with no
    boundary, the first local minimum of `d_t` (their dynamic rule: the first call where `d_t > d_(t-1)` and
    `d_(t-2) > d_(t-1)`, that call included). With a `curve` (timestep -> threshold) and a boundary, a generation
    switches at the first call with `t <= boundary` where its `d_t <= curve(t)` (its trajectory is no more
    text-driven than an ordinary prompt's there), and at the latest at the first call with `t <= latest`.
    `switched_at`: each generation's first call at full guidance (-1: never)."""

    def __init__(self, pipe: Any, guidance_scale: float, early: float, boundary: float | None = None,
                 curve: Callable[[float], float] | None = None, latest: float | None = None) -> None:
        super().__init__(pipe, guidance_scale)
        if curve is not None and (boundary is None or latest is None or latest > boundary):
            raise ValueError("a curve needs a boundary and a latest timestep at or below it")
        self.early, self.boundary, self.curve, self.latest = float(early), boundary, curve, latest
        self._later: torch.Tensor | None = None
        self._prev: torch.Tensor | None = None
        self._prev2: torch.Tensor | None = None
        self._switched_at: torch.Tensor | None = None

    def conditional(self, pred_u: torch.Tensor, pred_c: torch.Tensor, sample: torch.Tensor, timestep: Any,
                    d: torch.Tensor) -> torch.Tensor:
        if self._later is None:
            self._later = torch.zeros_like(d, dtype=torch.bool)
            self._switched_at = torch.full_like(d, -1, dtype=torch.long)
            self._prev = self._prev2 = torch.full_like(d, -1.0)  # the authors' start: no minimum before call 2
        assert self._prev is not None and self._prev2 is not None and self._switched_at is not None
        if self.boundary is None:
            now = ~self._later & (d > self._prev) & (self._prev2 > self._prev)
        else:
            t = float(torch.as_tensor(self.denoiser.scheduler_timestep(timestep)).reshape(-1)[0])
            due: torch.Tensor | bool = t <= self.boundary
            if self.curve is not None and due:
                assert self.latest is not None  # checked in __init__
                due = (d <= self.curve(t)) | (t <= self.latest)
            now = ~self._later & due
        self._switched_at[now] = self.calls
        self._later = self._later | now
        self._prev2, self._prev = self._prev, d
        scale = torch.where(self._later, self.scale, self.early)
        return self.reweighted(pred_u, pred_c, scale)

    @property
    def switched_at(self) -> list[int | None]:
        """Per generation, the call from which guidance was the pipeline's own (None: never)."""
        if self._switched_at is None:
            return []
        return [None if k < 0 else int(k) for k in self._switched_at.tolist()]
