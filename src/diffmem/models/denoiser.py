"""One path to a pipeline's denoiser: its conditional and unconditional predictions at a step, the first-step
input they start from, and conversions between what it predicts and the noise or the clean sample (METHOD.md).

`Denoiser(pipe)` is the single place where diffmem calls the denoiser network with a `Conditioning`: `pipe.unet`
for SD 1.x/2.x and SDXL, and for DeepFloyd IF (pixels, its epsilon half: the learned variance is dropped),
`pipe.transformer` for SD3, PixArt (its epsilon half) and Flux (packed latents, image and text position ids, the
distilled guidance input), so detection, explanation and mitigation start from the same `x_T` and see the same
predictions. `Parameterization` reads the prediction
type (epsilon, v_prediction, sample, or rectified flow's velocity `v = eps - x0` for a FlowMatch scheduler, with
`x_t = (1 - s) x0 + s eps` and `s = t / num_train_timesteps`) and the noise tables off a scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffmem.errors import InputError, UnsupportedModelError
from diffmem.models.conditioning import Conditioning, empty
from diffmem.models.defaults import PARAMETERIZATIONS, PREDICTION_TYPES, ModelDefaults, prediction_type_of  # noqa: F401 (re-exported)
from diffmem.models.families import (
    DEEPFLOYD,
    FLOW,
    FLUX,
    LEARNED_VARIANCE,
    NAMES,
    PIXART,
    SD3,
    UNET,
    family,
    network,
    scale_factor,
)


def own_steps_refusal(model: str) -> str:
    """Why diffmem does not follow `model`'s trajectory past the first step in its own loop (one line): its
    scheduler samples a learned variance (DeepFloyd IF's DDPM)."""
    return (f"{model}'s scheduler samples a learned variance: diffmem scores its first step (--steps first, the "
            "paper's setting) and, through the monitor, every step of a plain pipeline call, not later steps of its "
            "own loop")


def initial_noise(pipe: Any, generations: int, seed: int, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """Initial latents `x_T` for generations 0..n-1: generation g uses `torch.Generator().manual_seed(seed + g)`.

    The same noise serves every prompt, so a score depends on neither batch size nor batch composition, and a
    plain `pipe(..., latents=noise[g:g+1])` call reproduces exactly the trajectory that was scored. The size is
    the pipeline's default (`default_size`) unless given; Flux's latents are packed into 2x2 patches as its
    pipeline packs them, (n, h/2 * w/2, 4C).
    """
    height, width = height or default_size(pipe), width or default_size(pipe)
    channels, h, w = latent_shape(pipe, height, width)
    noise = torch.cat([torch.randn((1, channels, h, w), generator=torch.Generator().manual_seed(seed + g))
                       for g in range(generations)])
    return pipe._pack_latents(noise, generations, channels, h, w) if family(pipe) == FLUX else noise


def default_size(pipe: Any) -> int:
    """The image side in pixels a plain `pipe(prompt)` call generates: the denoiser's sample size times the VAE
    factor (Flux: the pipeline's `default_sample_size`, its transformer has no sample size; IF: no VAE)."""
    if family(pipe) == FLUX:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
    return int(network(pipe).config.sample_size * scale_factor(pipe))


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """Channels, height and width of the (unpacked) latent of an image of `height` x `width` pixels."""
    factor = scale_factor(pipe)
    if family(pipe) == FLUX:  # 2x2 patches: the latent side is even
        return network(pipe).config.in_channels // 4, 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    return network(pipe).config.in_channels, height // factor, width // factor


def alpha_sigma(
    scheduler: Any, timestep: torch.Tensor | float | int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sqrt(alpha_bar_t)` and `sqrt(1 - alpha_bar_t)` at (possibly fractional) training timesteps.

    A scalar timestep gives scalars; a vector of B timesteps gives tensors of shape (B, 1, 1, 1).
    """
    acp = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    t = torch.as_tensor(timestep, device=device, dtype=torch.float64).reshape(-1)
    t = (t[0] if t.numel() == 1 else t.reshape(-1, 1, 1, 1)).clamp(0, acp.numel() - 1)
    lo = t.floor().long()
    hi = torch.clamp(lo + 1, max=acp.numel() - 1)
    frac = t - lo
    abar = acp[lo] * (1 - frac) + acp[hi] * frac
    return abar.sqrt().float(), (1 - abar).sqrt().float()


@dataclass(frozen=True)
class Parameterization:
    """What a denoiser predicts (`kind`) and, from its scheduler's noise tables, how that output converts to the
    noise `eps` and the clean sample `x0` of its input `x_t = alpha_t x0 + sigma_t eps` (`flow`:
    `x_t = (1 - s) x0 + s eps`, output `v = eps - x0`, `s = t / num_train_timesteps` as FlowMatch schedulers set
    their timesteps).

    `sample` is always the denoiser's (scaled) input, `t` its timestep (a scalar or one per row). Results are
    float32. Build one with `Parameterization.of(scheduler)`. `to_score` gives the prediction a memorization
    score compares (METHOD.md): the noise for the diffusion kinds, the velocity for flow.
    """

    kind: str
    scheduler: Any

    def __post_init__(self) -> None:
        if self.kind not in PARAMETERIZATIONS:
            raise ValueError(f"unsupported prediction_type {self.kind!r}")
        flow_scheduler = prediction_type_of(type(self.scheduler).__name__, None) == "flow"
        if (self.kind == "flow") != flow_scheduler:
            raise ValueError(f"a {self.kind!r} parameterization does not match a {type(self.scheduler).__name__}: "
                             "flow needs a FlowMatch scheduler, and a FlowMatch scheduler means flow")

    @classmethod
    def of(cls, scheduler: Any) -> Parameterization:
        """The parameterization a scheduler is configured for (`prediction_type`, epsilon when unset; `flow` for a
        FlowMatch scheduler)."""
        return cls(prediction_type_of(type(scheduler).__name__, scheduler.config.get("prediction_type")), scheduler)

    @property
    def score_space(self) -> str:
        """What `to_score` returns: `velocity` (flow) or `epsilon`."""
        return "velocity" if self.kind == "flow" else "epsilon"

    def sigma(self, t: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """Flow's noise level `s = t / num_train_timesteps` (float64), shaped to broadcast over `sample`'s rows."""
        s = torch.as_tensor(t, device=sample.device, dtype=torch.float64).reshape(-1)
        s = s / self.scheduler.config.num_train_timesteps
        return s[0] if s.numel() == 1 else s.reshape(-1, *(1,) * (sample.dim() - 1))

    def to_score(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The prediction whose text-conditional difference is the memorization score: `to_epsilon` for the
        diffusion kinds, the velocity itself for flow (at `s = 1` the noise prediction is `x_t` for every
        prompt and `v_c - v_u = -(x0_c - x0_u)`; at `s < 1`, `v_c - v_u = -(x0_c - x0_u) / s`)."""
        return output.float() if self.kind == "flow" else self.to_epsilon(output, sample, t)

    def alpha_sigma(self, t: torch.Tensor | float | int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_t` and `sigma_t` of the input at `t` (see the module function `alpha_sigma`)."""
        return alpha_sigma(self.scheduler, t, device)

    def to_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The noise prediction implied by `output` for the input `sample`."""
        out = output.float()
        if self.kind == "epsilon":
            return out
        if self.kind == "flow":  # eps = x_t + (1 - s) v
            return (sample.double() + (1 - self.sigma(t, sample)) * out.double()).float()
        alpha, sigma = self.alpha_sigma(t, out.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return alpha * out + sigma * x
        return (x - alpha * out) / sigma  # sample

    def to_x0(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The clean-sample prediction implied by `output` for the input `sample`."""
        out = output.float()
        if self.kind == "sample":
            return out
        if self.kind == "flow":  # x0 = x_t - s v
            return (sample.double() - self.sigma(t, sample) * out.double()).float()
        alpha, sigma = self.alpha_sigma(t, out.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return alpha * x - sigma * out
        return (x - sigma * out) / alpha  # epsilon

    def from_epsilon(self, eps: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The output this parameterization gives for the noise prediction `eps` at the input `sample` (the inverse
        of `to_epsilon`). For flow it is defined below `s = 1` only: at `s = 1` the noise is the input itself and
        says nothing of the velocity (ValueError)."""
        eps = eps.float()
        if self.kind == "epsilon":
            return eps
        if self.kind == "flow":  # v = (eps - x_t) / (1 - s)
            s = self.sigma(t, sample)
            if bool((s >= 1).any()):
                raise ValueError("at s = 1 a flow model's noise prediction is its input: it determines no velocity")
            return ((eps.double() - sample.double()) / (1 - s)).float()
        alpha, sigma = self.alpha_sigma(t, eps.device)
        x = sample.float()
        if self.kind == "v_prediction":
            return (eps - sigma * x) / alpha  # alpha * eps - sigma * x0, with alpha^2 + sigma^2 = 1
        return (x - sigma * eps) / alpha  # sample


class Denoiser:
    """A pipeline's denoiser as diffmem calls it: raw predictions (in the model's own parameterization) for
    conditioning rows, classifier-free-guidance pairs, and the first-step input of given noises.

    It holds no schedule: `schedule(n)` gives a fresh scheduler (stepping one mutates it), and conversions read
    the scheduler they are given (`Parameterization.of(scheduler)`). It caches the empty prompt's conditioning and,
    for `cfg_shared`, the empty prompt's predictions on one shared input per timestep.

    Wen et al.'s first-step score by hand, `|| eps(x_T, prompt) - eps(x_T, "") ||`, as `detect` computes it:

        >>> import torch
        >>> from diffmem import detect, load_pipeline
        >>> from diffmem.models.conditioning import encode
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> denoiser, prompt = Denoiser(pipe), "a orange ring at the center on a gradient background"
        >>> scheduler = denoiser.schedule(50)  # a fresh scheduler: stepping one mutates it
        >>> x, t = denoiser.first_input(initial_noise(pipe, 1, seed=0), scheduler), scheduler.timesteps[0]
        >>> with torch.no_grad():  # the testbed predicts v: `cfg_epsilon` converts both halves to epsilon
        ...     eps_c, eps_u = denoiser.cfg_epsilon(x, t, encode(pipe, [prompt]), denoiser.empty(),
        ...                                         Parameterization.of(scheduler))
        >>> abs(float((eps_c - eps_u).norm()) - detect(pipe, [prompt])[0].score) < 1e-4
        True
    """

    def __init__(self, pipe: Any, height: int | None = None, width: int | None = None) -> None:
        self.pipe = pipe
        self.family = family(pipe)
        self.height = height or default_size(pipe)
        self.width = width or default_size(pipe)
        """The image size its inputs are latents of (the pipeline's default): Flux's position ids depend on it."""
        self._empty: Conditioning | None = None
        self._shared_uncond: dict[float, torch.Tensor] = {}

    @property
    def model(self) -> Any:
        """The denoiser network, read from the pipeline at each use (`pipe.unet` or `pipe.transformer`)."""
        return network(self.pipe)

    @property
    def flow(self) -> bool:
        """Whether the model is trained by rectified flow (SD3, Flux)."""
        return self.family in FLOW

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def empty(self) -> Conditioning:
        """The empty prompt's one-row conditioning by the pipeline's own convention (computed once, no graph)."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = empty(self.pipe)
        return self._empty

    def schedule(self, num_inference_steps: int) -> Any:
        """A fresh copy of the pipeline's scheduler, set to `num_inference_steps` on the denoiser's device as a
        plain pipeline call sets it (Flux: its sigmas `linspace(1, 1/n, n)` and the resolution shift `mu`; SD3
        with dynamic shifting: its `mu`)."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        config, kwargs = scheduler.config, {}
        if self.family == FLUX:
            kwargs["sigmas"] = None if config.get("use_flow_sigmas") else np.linspace(
                1.0, 1 / num_inference_steps, num_inference_steps)
        if self.family == FLUX or (self.family == SD3 and config.get("use_dynamic_shifting")):
            _, h, w = latent_shape(self.pipe, self.height, self.width)
            patch = 2 if self.family == FLUX else self.model.config.patch_size
            tokens = (h // patch) * (w // patch)
            base, most = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15 if self.family == FLUX else 1.16)
            kwargs["mu"] = low + (high - low) * (tokens - base) / (most - base)  # diffusers' calculate_shift
        scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return scheduler

    def start(self, noise: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The latents a pipeline starts from for unit-variance noises `noise`: on the denoiser's device and dtype,
        scaled by the scheduler's `init_noise_sigma` (1 for flow schedulers, which have none)."""
        return noise.to(self.device, self.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)

    def scale_input(self, latents: torch.Tensor, scheduler: Any, t: torch.Tensor) -> torch.Tensor:
        """The denoiser input of `latents` at `t`: the scheduler's `scale_model_input` (flow: the latents)."""
        scale = getattr(scheduler, "scale_model_input", None)
        return latents if scale is None else scale(latents, t)

    def first_input(self, noise: torch.Tensor, scheduler: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser input for unit-variance noises `noise` (rows, C, H, W; Flux packed) at `t` (the schedule's
        first timestep unless given): `start` then `scale_input`, as the pipeline starts from `latents=noise`."""
        t = scheduler.timesteps[0] if t is None else t
        return self.scale_input(self.start(noise, scheduler), scheduler, t)

    def unpacked(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as (rows, C, H, W): Flux's packed 2x2 patches unpacked as its pipeline unpacks them before
        decoding; the other families' latents as they are."""
        if self.family != FLUX:
            return latents
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)

    def call_kwargs(self, cond: Conditioning, negative: Conditioning, guidance_scale: float) -> dict[str, Any]:
        """The keyword arguments of a plain `pipe(...)` call that samples rows `cond` against `negative` with
        classifier-free guidance `guidance_scale`, as the family's pipeline takes them: Flux guides by true CFG
        (`true_cfg_scale`; its distilled guidance input stays the pipeline's default), PixArt without resolution
        binning (the latents fix the size), the transformer families at this denoiser's image size."""
        return {**cond.pipe_kwargs(negative), **self.call_options(embeddings=True),
                **self.guidance(guidance_scale, embeddings=True)}

    def guidance(self, guidance_scale: float, embeddings: bool) -> dict[str, Any]:
        """The guidance arguments of a plain `pipe(...)` call against the empty prompt: `guidance_scale` for the
        families that batch both branches; Flux's true CFG (`true_cfg_scale`, and beside a text prompt rather than
        `embeddings` its `negative_prompt=""`: it has no negative prompt by default), its distilled guidance input
        left at the pipeline's default."""
        if self.family != FLUX:
            return {"guidance_scale": guidance_scale}
        return {"true_cfg_scale": guidance_scale, **({} if embeddings else {"negative_prompt": ""})}

    def call_options(self, embeddings: bool) -> dict[str, Any]:
        """The family's arguments of a plain `pipe(...)` call from latents besides its text and guidance: none for
        the UNet family; the transformer families' image size, PixArt without resolution binning (the latents
        fix the size) and, beside `embeddings`, without its default negative prompt "" (it refuses both)."""
        if self.family == UNET:
            return {}
        options: dict[str, Any] = {"height": self.height, "width": self.width}
        if self.family == PIXART:
            options["use_resolution_binning"] = False
            if embeddings:
                options["negative_prompt"] = None
        return options

    @contextlib.contextmanager
    def starting_from(self, noise: torch.Tensor, seeds: Sequence[int]) -> Iterator[dict[str, Any]]:
        """Within the block, the arguments that make a plain `pipe(...)` call start from `noise` (one row per image,
        drawn as `initial_noise` draws them from `seeds`, one per row): `latents=noise`, except for DeepFloyd IF.
        Its call takes no latents and samples DDPM noise at every step: it gets one generator per row, seeded as
        the row's noise was, and draws its first images in `prepare_intermediate_images`, which the block
        replaces on the pipeline object by one that draws them as usual (so each generator moves on as in a
        plain call) and returns `noise` instead. A call from `initial_noise(pipe, n, seed)` is then bit for bit a
        plain call with generators seeded seed..seed+n-1."""
        if self.family != DEEPFLOYD:
            yield {"latents": noise}
            return
        if len(seeds) != noise.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {noise.shape[0]} rows of noise")
        pipe, drawn = self.pipe, type(self.pipe).prepare_intermediate_images

        def prepare(batch_size: int, num_channels: int, height: int, width: int, dtype: torch.dtype,
                    device: torch.device, generator: Any) -> torch.Tensor:
            usual = drawn(pipe, batch_size, num_channels, height, width, dtype, device, generator)
            if usual.shape != noise.shape:
                raise InputError(f"noise of shape {tuple(noise.shape)} does not start a call of {batch_size} "
                                 f"{num_channels}x{height}x{width} images")
            return noise.to(device, dtype) * pipe.scheduler.init_noise_sigma

        shadowed = vars(pipe).get("prepare_intermediate_images")
        pipe.prepare_intermediate_images = prepare
        try:
            yield {"generator": [torch.Generator().manual_seed(int(s)) for s in seeds]}
        finally:
            if shadowed is None:
                del pipe.prepare_intermediate_images
            else:
                pipe.prepare_intermediate_images = shadowed

    @contextlib.contextmanager
    def forward_mode(self) -> Iterator[None]:
        """Within the block, the network can be differentiated in forward mode (`torch.func.jvp`): attention by
        the math kernel (the fused ones have no forward-mode rule) and every group norm's input made contiguous
        (its forward-mode rule views the input, which IF's attention blocks hand over strided). Values do not
        change."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def contiguous(module: Any, args: tuple) -> tuple:
            return (args[0].contiguous(), *args[1:])

        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.GroupNorm)]
        handles = [m.register_forward_pre_hook(contiguous) for m in norms]
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def check_steps(self, n_steps: int) -> None:
        """Refuse to follow a trajectory for `n_steps` > 1 of diffmem's own steps (`step`) where it cannot: a
        scheduler that samples a learned variance (DeepFloyd IF's DDPM) needs that variance and its own noise."""
        if n_steps > 1 and self.pipe.scheduler.config.get("variance_type") in ("learned", "learned_range"):
            raise UnsupportedModelError(own_steps_refusal(NAMES[self.family]))

    def step(self, scheduler: Any, guided: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latents after one step of `scheduler` from the guided prediction `guided` (diffmem's own loops)."""
        self.check_steps(2)
        return scheduler.step(guided, t, latents, return_dict=False)[0]

    def predict(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                model: Any = None) -> torch.Tensor:
        """The raw output for input rows `sample` and conditioning rows `cond` (one each) at `t` (the scheduler's
        timestep), called as the family's pipeline calls it; PixArt's is its epsilon half (`prediction`). `model`
        replaces the pipeline's network (e.g. the same one wrapped for data-parallel training)."""
        net = self.model if model is None else model
        if self.family in (UNET, DEEPFLOYD):
            return self.prediction(net(sample, t, **cond.unet_kwargs(), return_dict=False)[0])
        rows = sample.shape[0]
        steps = torch.as_tensor(t, device=sample.device).reshape(-1)
        steps = steps.expand(rows) if steps.numel() == 1 else steps
        if self.family == SD3:
            return net(hidden_states=sample, timestep=steps, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled_embeds, return_dict=False)[0]
        if self.family == PIXART:
            out = net(sample, encoder_hidden_states=cond.prompt_embeds,
                      encoder_attention_mask=cond.attention_mask, timestep=steps,
                      added_cond_kwargs=self._micro_conditions(rows), return_dict=False)[0]
            return self.prediction(out)
        return net(hidden_states=sample, timestep=steps.to(sample.dtype) / 1000,
                   guidance=self._distilled_guidance(rows), pooled_projections=cond.pooled_embeds,
                   encoder_hidden_states=cond.prompt_embeds,
                   txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=sample.device,
                                       dtype=cond.prompt_embeds.dtype),
                   img_ids=self._image_ids(sample, cond.prompt_embeds.dtype), return_dict=False)[0]

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction in a raw network output: PixArt's and IF's first `in_channels` channels when it also
        predicts its variance (learned sigma), else the output itself."""
        channels = self.model.config.in_channels
        if self.family in LEARNED_VARIANCE and output.dim() == 4 and output.shape[1] == 2 * channels:
            return output[:, :channels]
        return output

    def scheduler_timestep(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """The scheduler's timestep of a timestep the network was called with (Flux's is divided by 1000)."""
        value = torch.as_tensor(timestep)
        return value * 1000 if self.family == FLUX else value

    def _micro_conditions(self, rows: int) -> dict[str, torch.Tensor | None]:
        """PixArt-alpha's resolution and aspect-ratio inputs, as its pipeline gives them (1024-pixel models
        only); PixArt-sigma's pipeline gives none."""
        if type(self.pipe).__name__ != "PixArtAlphaPipeline" or self.model.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        size = torch.tensor([[self.height, self.width]], device=self.device, dtype=self.dtype).repeat(rows, 1)
        ratio = torch.tensor([[self.height / self.width]], device=self.device, dtype=self.dtype).repeat(rows, 1)
        return {"resolution": size, "aspect_ratio": ratio}

    def _distilled_guidance(self, rows: int) -> torch.Tensor | None:
        """Flux's guidance input: the distilled guidance value for each row (None for a model without one)."""
        value = ModelDefaults.of(self.pipe).distilled_guidance
        if not self.model.config.guidance_embeds or value is None:
            return None
        return torch.full([1], value, device=self.device, dtype=torch.float32).expand(rows)

    def _image_ids(self, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Flux's latent position ids for packed latents of this denoiser's image size."""
        _, h, w = latent_shape(self.pipe, self.height, self.width)
        if sample.shape[1] != (h // 2) * (w // 2):
            raise ValueError(f"{sample.shape[1]} latent patches are not a {self.height}x{self.width} image's "
                             f"{(h // 2) * (w // 2)}: give the Denoiser the image size")
        return self.pipe._prepare_latent_image_ids(sample.shape[0], h // 2, w // 2, sample.device, dtype)

    def _cfg_batch(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and input of one batched call on rows `[uncond; cond]` (diffusers' CFG order)."""
        inputs = torch.cat([sample, sample])
        return self.predict(inputs, t, Conditioning.cat([uncond, cond])), inputs

    def cfg(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning,
            uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pred_c, pred_u)` for input rows `sample` under `cond` and `uncond` (as many rows each), from one batched
        call."""
        pred_u, pred_c = self._cfg_batch(sample, t, cond, uncond)[0].chunk(2)
        return pred_c, pred_u

    def cfg_epsilon(self, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                    param: Parameterization) -> tuple[torch.Tensor, torch.Tensor]:
        """`(eps_c, eps_u)`: `cfg` converted to epsilon space as one batch, differentiable in `sample` (gradients
        and forward-mode tangents alike)."""
        pred, inputs = self._cfg_batch(sample, t, cond, uncond)
        eps_u, eps_c = param.to_epsilon(pred, inputs, t).chunk(2)
        return eps_c, eps_u

    def shared_uncond(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The empty prompt's output on the shared input `sample` (one row per generation) at `t`, computed once per
        timestep without a graph: pass the same `sample` at every call on this `Denoiser`."""
        key = float(t)
        if key not in self._shared_uncond:
            with torch.no_grad():
                self._shared_uncond[key] = self.predict(sample, t, self.empty().expand(sample.shape[0]))
        return self._shared_uncond[key]

    def cfg_shared(self, sample: torch.Tensor, t: torch.Tensor,
                   cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(pred_c, pred_u, inputs)` for every row of `cond` on each row of the shared input `sample` (rows
        prompt-major: cond row i with sample row g is row `i * len(sample) + g`). Only the conditional rows are
        computed; the empty prompt's come from `shared_uncond`, the same for every prompt on the same noise."""
        tile = (len(cond),) + (1,) * (sample.dim() - 1)
        inputs = sample.repeat(tile)
        pred_c = self.predict(inputs, t, cond.repeat_interleave(sample.shape[0]))
        pred_u = self.shared_uncond(sample, t).repeat(tile)
        return pred_c, pred_u, inputs
