"""Record memorization magnitudes during an ordinary diffusers pipeline call, at no extra denoiser cost.

A forward hook on the pipeline's UNet reads the CFG batch it already computes (first half `eps_u`, second half
`eps_c`, as diffusers' Stable Diffusion pipelines order it) and stores `d_t` per row on the device. Nothing it
does changes the UNet's output, so images are bit-identical with and without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffmem.detectors.base import parse_steps
from diffmem.errors import InputError
from diffmem.models.denoiser import Parameterization


class Monitor:
    """Attach to `pipe`, run `pipe(...)` as usual, then read `scores()`; use as a context manager to detach.

    With `pipe(prompts, num_images_per_prompt=n)` rows are prompt-major (p0g0, p0g1, ..., p1g0, ...).
    `stop_after=k` removes the hook once k guided steps are recorded, so later steps run without it;
    `on_record(d_t)` is called with each recorded step's magnitudes (an exception it raises stops the call).
    It also records the norm of each latent update (`update_norms`, the step-norm signal of Huang et al., KDD
    2026) and, with `keep_differences=True`, the vectors `eps_c - eps_u` themselves (`differences`).
    """

    def __init__(self, pipe, stop_after: int | None = None,
                 on_record: Callable[[torch.Tensor], None] | None = None, keep_differences: bool = False) -> None:
        self.pipe = pipe
        self.stop_after = stop_after
        self.on_record = on_record
        self.keep_differences = keep_differences
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._steps: list[torch.Tensor] = []
        self._timesteps: list[torch.Tensor] = []
        self._updates: list[torch.Tensor] = []
        self._differences: list[torch.Tensor] = []
        self._last_input: torch.Tensor | None = None
        self.unguided_calls = 0

    def attach(self) -> Monitor:
        """Start recording (clears anything recorded before)."""
        self.detach()
        self.reset()
        self._handle = self.pipe.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the hook; the pipeline is exactly as before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reset(self) -> None:
        self._steps.clear()
        self._timesteps.clear()
        self._updates.clear()
        self._differences.clear()
        self._last_input = None
        self.unguided_calls = 0

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        pred = output[0] if isinstance(output, tuple) else output.sample
        if pred.shape[0] % 2 or not self._guided():
            self.unguided_calls += 1  # no CFG batch (guidance_scale <= 1): nothing to measure
            return
        with torch.no_grad():
            param = Parameterization.of(self.pipe.scheduler)  # the running call's scheduler
            eps = param.to_epsilon(pred.detach(), sample.detach(), timestep)
            eps_u, eps_c = eps.chunk(2)
            self._steps.append((eps_c - eps_u).flatten(1).norm(dim=1))
            self._timesteps.append(torch.as_tensor(timestep).reshape(-1)[:1].detach())
            if self.keep_differences:
                self._differences.append(eps_c - eps_u)
            latent = sample.detach().chunk(2)[0].float()  # both halves hold the same latents
            if self._last_input is not None:
                self._updates.append((latent - self._last_input).flatten(1).norm(dim=1))
            self._last_input = latent
        if self.stop_after is not None and len(self._steps) >= self.stop_after:
            self.detach()
        if self.on_record is not None:
            self.on_record(self._steps[-1])

    def _guided(self) -> bool:
        """Whether the running pipeline call does CFG (guidance_scale <= 1: an even batch is no CFG pair)."""
        try:
            return bool(self.pipe.do_classifier_free_guidance)  # diffusers sets it at the start of each call
        except AttributeError:  # the UNet was called outside a pipeline call: trust the batch layout
            return True

    def magnitudes(self) -> torch.Tensor:
        """All recorded `d_t`, shape (rows, steps), on the CPU."""
        if not self._steps:
            hint = " (guidance_scale <= 1 disables CFG)" if self.unguided_calls else ""
            raise InputError(f"the monitor recorded no guided denoiser call{hint}")
        return torch.stack(self._steps, dim=1).double().cpu()

    def update_norms(self) -> torch.Tensor:
        """`||x_(k+1) - x_k||_2` between the denoiser inputs of consecutive recorded steps, shape (rows, steps - 1), on
        the CPU: the latent update of each step but the last (for DDIM, whose inputs are the latents themselves)."""
        if not self._updates:
            raise InputError("the monitor recorded fewer than two guided steps: no latent update to measure")
        return torch.stack(self._updates, dim=1).double().cpu()

    def differences(self) -> list[torch.Tensor]:
        """`eps_c - eps_u` of every recorded step (rows, C, H, W each, on the device); needs `keep_differences`."""
        return list(self._differences)

    def timesteps(self) -> list[float]:
        return [float(t) for t in torch.cat(self._timesteps).cpu()] if self._timesteps else []

    def scores(self, num_images_per_prompt: int = 1, steps: str | int = "first") -> torch.Tensor:
        """Per-prompt score: mean `d_t` over the first `steps` recorded steps and the prompt's generations."""
        mags = self.magnitudes()
        k = parse_steps(steps, mags.shape[1])
        rows = mags.shape[0]
        if rows % num_images_per_prompt:
            raise InputError(
                f"{rows} rows are not a multiple of num_images_per_prompt={num_images_per_prompt}"
            )
        return mags[:, :k].reshape(rows // num_images_per_prompt, -1).mean(dim=1)
