"""Record memorization magnitudes during an ordinary diffusers pipeline call, at no extra denoiser cost.

A forward hook on the pipeline's denoiser reads the CFG batch it already computes (first half unconditional,
second half conditional, as diffusers' SD, SDXL, SD3 and PixArt pipelines order it) and stores `d_t` per row on
the device, in the space the score reads (epsilon; a flow model's velocity: METHOD.md section 8). Flux runs true
CFG as two calls per step, the prompt's and then the negative prompt's on the same latents: the hook keeps the
first and measures at the second (`pipe(..., negative_prompt="", true_cfg_scale=w)` with w > 1; without true CFG
there is no unconditional branch to read). Nothing it does changes the denoiser's output, so images are
bit-identical with and without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from diffmem.detectors.base import parse_steps
from diffmem.errors import InputError
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.models.families import FLUX, network


class Monitor:
    """Attach to `pipe`, run `pipe(...)` as usual, then read `scores()`; use as a context manager to detach.

    With `pipe(prompts, num_images_per_prompt=n)` rows are prompt-major (p0g0, p0g1, ..., p1g0, ...); the monitor
    notes that `n` (it watches `pipe.encode_prompt` while attached) and `scores()` refuses another one.
    `stop_after=k` removes the hook once k guided steps are recorded, so later steps run without it;
    `on_record(d_t)` is called with each recorded step's magnitudes (an exception it raises stops the call).
    It also records the norm of each latent update (`update_norms`, the step-norm signal of Huang et al., KDD
    2026) and, with `keep_differences=True`, the vectors `eps_c - eps_u` themselves (`differences`).

        >>> import torch
        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> with Monitor(pipe) as monitor:  # the images are bit-identical to those of the same call without it
        ...     images = pipe([splits.planted[0].caption, splits.heldout[0].caption], num_inference_steps=10,
        ...                   generator=torch.Generator().manual_seed(0)).images
        >>> [round(float(score), 2) for score in monitor.scores()], tuple(monitor.magnitudes().shape)  # rows x steps
        ([1.23, 1.02], (2, 10))
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
        self._encode: Callable[..., Any] | None = None
        self._shadowed: Callable[..., Any] | None = None  # an instance wrapper the monitor's own shadows
        self._last_n: int | None = None
        self._last_cfg: bool | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # Flux: the prompt's output and its input
        self._denoiser: Denoiser | None = None
        self.images_per_prompt: int | None = None
        """`num_images_per_prompt` of the watched pipeline call (None: not seen, e.g. the UNet called directly)."""

    def attach(self) -> Monitor:
        """Start recording (clears anything recorded before)."""
        self.detach()
        self.reset()
        self._denoiser = Denoiser(self.pipe)
        self._handle = network(self.pipe).register_forward_hook(self._hook, with_kwargs=True)
        self._watch_encode_prompt()
        return self

    def detach(self) -> None:
        """Remove the hook; the pipeline is exactly as before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._encode is not None and vars(self.pipe).get("encode_prompt") is self._encode:
            if self._shadowed is not None:  # another wrapper was there before: it again
                self.pipe.encode_prompt = self._shadowed
            else:
                del self.pipe.encode_prompt  # the class's method again
        self._encode = self._shadowed = None

    def _watch_encode_prompt(self) -> None:
        """Shadow `pipe.encode_prompt` with a wrapper that notes its `num_images_per_prompt` (diffusers' SD and
        SDXL pipelines call it once per call, before the first denoiser call) and changes nothing else."""
        original = getattr(self.pipe, "encode_prompt", None)
        if original is None:  # a stand-in pipeline: the count stays unknown
            return
        try:
            signature = inspect.signature(original)
        except (TypeError, ValueError):
            return
        defaults = {name: p.default for name, p in signature.parameters.items()}

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:
                arguments = {}
            n = arguments.get("num_images_per_prompt", defaults.get("num_images_per_prompt"))
            cfg = arguments.get("do_classifier_free_guidance", defaults.get("do_classifier_free_guidance"))
            self._last_n = n if isinstance(n, int) else None
            self._last_cfg = cfg if isinstance(cfg, bool) else None  # PixArt keeps its CFG flag in a local
            return original(*args, **kwargs)

        self._encode, self._shadowed = encode_prompt, vars(self.pipe).get("encode_prompt")
        self.pipe.encode_prompt = encode_prompt

    def reset(self) -> None:
        self._steps.clear()
        self._timesteps.clear()
        self._updates.clear()
        self._differences.clear()
        self._last_input = None
        self.unguided_calls = 0
        self._last_n = None
        self._last_cfg = None
        self._pending = None
        self.images_per_prompt = None

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module, args, kwargs, output) -> None:
        denoiser = self._denoiser
        assert denoiser is not None  # set by attach
        if kwargs.get("skip_layers") is not None:
            return  # SD3's skip-layer guidance: an extra conditional call, not a CFG branch
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = denoiser.scheduler_timestep(args[1] if len(args) > 1 else kwargs["timestep"])
        pred = denoiser.prediction(output[0] if isinstance(output, tuple) else output.sample)
        if denoiser.family == FLUX:  # true CFG: the prompt's call, then the negative prompt's on the same latents
            pending, self._pending = self._pending, None
            if pending is None or sample is not pending[1]:
                self.unguided_calls += pending is not None  # the previous step had no negative-prompt call
                self._pending = (pred.detach(), sample)
                return
            self._record(pending[0], pred.detach(), sample.detach(), timestep)
            return
        if pred.shape[0] % 2 or not self._guided():
            self.unguided_calls += 1  # no CFG batch (guidance_scale <= 1): nothing to measure
            return
        pred_u, pred_c = pred.detach().chunk(2)
        self._record(pred_c, pred_u, sample.detach().chunk(2)[0], timestep)  # both halves hold the same latents

    def _record(self, pred_c: torch.Tensor, pred_u: torch.Tensor, sample: torch.Tensor,
                timestep: torch.Tensor) -> None:
        """Store `d_t` (and the update norm, the differences) of one guided step from its two branches' outputs
        on the latents `sample`."""
        if not self._steps:  # the first guided step: the call's encode_prompt has run (later ones are not its)
            self.images_per_prompt = self._last_n
        with torch.no_grad():
            param = Parameterization.of(self.pipe.scheduler)  # the running call's scheduler
            diff = param.to_score(pred_c, sample, timestep) - param.to_score(pred_u, sample, timestep)
            self._steps.append(diff.flatten(1).norm(dim=1))
            self._timesteps.append(torch.as_tensor(timestep).reshape(-1)[:1].detach())
            if self.keep_differences:
                self._differences.append(diff)
            latent = sample.float()
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
        except AttributeError:  # PixArt's flag is the one its encode_prompt got; else trust the batch layout
            return True if self._last_cfg is None else self._last_cfg

    def magnitudes(self) -> torch.Tensor:
        """All recorded `d_t`, shape (rows, steps), on the CPU."""
        if not self._steps:
            hint = " (guidance_scale <= 1 disables CFG)" if self.unguided_calls else ""
            if self._denoiser is not None and self._denoiser.family == FLUX:
                hint = " (Flux computes the unconditional branch only with negative_prompt=\"\" and true_cfg_scale > 1)"
            raise InputError(f"the monitor recorded no guided denoiser call{hint}")
        return torch.stack(self._steps, dim=1).double().cpu()

    def update_norms(self) -> torch.Tensor:
        """`||x_(k+1) - x_k||_2` between the denoiser inputs of consecutive recorded steps, shape (rows, steps - 1), on
        the CPU: the latent update of each step but the last (for DDIM, whose inputs are the latents themselves)."""
        if not self._updates:
            raise InputError("the monitor recorded fewer than two guided steps: no latent update to measure")
        return torch.stack(self._updates, dim=1).double().cpu()

    def differences(self) -> list[torch.Tensor]:
        """`eps_c - eps_u` (flow: `v_c - v_u`) of every recorded step (rows, C, H, W each; Flux: packed), on the
        device; needs `keep_differences`."""
        return list(self._differences)

    def timesteps(self) -> list[float]:
        return [float(t) for t in torch.cat(self._timesteps).cpu()] if self._timesteps else []

    def scores(self, num_images_per_prompt: int | None = None, steps: str | int = "first") -> torch.Tensor:
        """Per-prompt score: mean `d_t` over the first `steps` recorded steps and the prompt's generations.

        `num_images_per_prompt` defaults to the watched call's (1 when unknown); one that differs from it, or
        that does not divide the recorded rows, is an InputError.
        """
        mags = self.magnitudes()
        k = parse_steps(steps, mags.shape[1])
        rows = mags.shape[0]
        recorded = self.images_per_prompt
        if num_images_per_prompt is None:
            num_images_per_prompt = recorded or 1
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be a positive integer, not {num_images_per_prompt!r}")
        if recorded is not None and num_images_per_prompt != recorded:
            raise InputError(f"num_images_per_prompt={num_images_per_prompt} does not match the pipeline call the "
                             f"monitor recorded, which made {recorded} image(s) per prompt")
        if rows % num_images_per_prompt:
            raise InputError(
                f"{rows} rows are not a multiple of num_images_per_prompt={num_images_per_prompt}"
            )
        return mags[:, :k].reshape(rows // num_images_per_prompt, -1).mean(dim=1)
