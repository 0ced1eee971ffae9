"""A model's defaults, read and checked once: `ModelDefaults`, the one place that reads a model's diffmem.json.

A model folder may carry `diffmem.json` beside model_index.json with its own guidance scale, mitigation target
loss, SAIL threshold, calibrated detection threshold and guidance transition curve; what it leaves out comes from
the family's defaults (diffusers' guidance: SD 7.5, SDXL 5.0) and the published ones (Wen et al.'s target loss,
SAIL's threshold, both for SD v1.4). The diffusers configs add what the methods need to know about the model
(prediction type, resolution, scheduler). `load_pipeline` attaches the object to the pipeline; commands read it
before loading (`ModelDefaults.for_model`) to record their settings, and every method resolves an option left at
None with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from diffmem.errors import ModelLoadError, UnsupportedModelError
from diffmem.io.durable import replace_file
from diffmem.models.families import FAMILIES, NAMES
from diffmem.models.folders import PIXEL_PIPELINES, read_metadata, resolve_model

DEFAULTS_FILE = "diffmem.json"
"""The file beside model_index.json with the model's own defaults (e.g. {"guidance_scale": 3.0})."""
SD_GUIDANCE_SCALE = 7.5
"""Stable Diffusion's guidance scale (diffusers' default): that of a model that names neither its own nor a family."""
FAMILY_GUIDANCE = {"StableDiffusionPipeline": SD_GUIDANCE_SCALE, "StableDiffusionXLPipeline": 5.0,
                   "StableDiffusion3Pipeline": 7.0, "PixArtSigmaPipeline": 4.5, "PixArtAlphaPipeline": 4.5,
                   "FluxPipeline": 1.0, "IFPipeline": 7.0}
"""Each pipeline class's default guidance scale (diffusers' `__call__` defaults). Flux's is its `true_cfg_scale`
(1: true CFG off, the distilled model samples its conditional branch alone); see DISTILLED_GUIDANCE."""
DISTILLED_GUIDANCE = {"FluxPipeline": 3.5}
"""The guidance value a guidance-distilled family embeds in its denoiser input (diffusers' `guidance_scale`
default of its `__call__`); both CFG branches are computed at it (METHOD.md, flow models)."""
WEN_TARGET_LOSS = 3.0
"""`l_target` of Wen et al.'s code for SD v1.4 (64x64x4 latents). `d_t` grows like the square root of the latent
size and depends on the model, so a model should carry its own, calibrated on its non-memorized prompts (their
median first-step score: `negatives_median` of `diffmem evaluate --json`)."""
SAIL_THRESHOLD = 8.2
"""SAIL's `l_thres` for SD v1.4 (Jeon et al.'s code); the loss grows with the latent size: calibrate per model."""
OWN_FIELDS = ("guidance_scale", "target_loss", "sail_threshold", "detection_threshold", "transition_curve")
"""What a model's diffmem.json may set."""
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""The diffusion schedulers' prediction types diffmem converts to epsilon (`models.denoiser.Parameterization`)."""
PARAMETERIZATIONS = (*PREDICTION_TYPES, "flow")
"""Every parameterization diffmem reads: the prediction types and `flow`, rectified flow's velocity `v = eps - x0`
(what a FlowMatch scheduler's denoiser predicts)."""
_ATTRIBUTE = "diffmem_defaults"
_FILES = {"pipeline": "model_index.json", "scheduler": "scheduler/scheduler_config.json",
          "prediction_type": "scheduler/scheduler_config.json",
          "num_train_timesteps": "scheduler/scheduler_config.json", "resolution": "unet/config.json",
          **{name: DEFAULTS_FILE for name in OWN_FIELDS}}


@dataclass(frozen=True)
class ModelDefaults:
    """A model's defaults, validated on construction (a bad value is one `ModelLoadError` naming its file and field).

    `own` names the fields the model's diffmem.json sets; the others are its family's or the published defaults.
    `detection_threshold` (flag `score >= threshold`, calibrated at 1% FPR) is None unless the model names one.
    `transition_curve` ((timestep, d_t) pairs, timesteps falling; None unless the model names one) is where ordinary
    prompts' `d_t` lies along an unguided trajectory (`diffmem.mitigate.delayed_guidance.transition_curve`): the
    default mitigation starts guidance per generation once its own `d_t` falls to it. `resolution` is the image
    side in pixels (denoiser sample size x VAE scale factor), None when the configs do not say. `folder` is where
    it was read (None: a pipeline's in-memory configs, or a hub id not downloaded).

        >>> from diffmem.models.defaults import ModelDefaults
        >>> defaults = ModelDefaults.for_model("testbed")  # read before loading; `ModelDefaults.of(pipe)` after
        >>> defaults.guidance_scale, defaults.prediction_type, defaults.resolution, sorted(defaults.own)
        (2.5, 'v_prediction', 32, ['guidance_scale', 'target_loss', 'transition_curve'])
        >>> defaults.resolve_guidance(None), defaults.resolve_guidance(4.0)  # an option left at None: the model's
        (2.5, 4.0)
        >>> defaults.override(detection_threshold=0.6).own_values()["detection_threshold"]  # what `save` would write
        0.6
    """

    guidance_scale: float = SD_GUIDANCE_SCALE
    target_loss: float = WEN_TARGET_LOSS
    sail_threshold: float = SAIL_THRESHOLD
    detection_threshold: float | None = None
    transition_curve: tuple[tuple[float, float], ...] | None = None
    prediction_type: str = "epsilon"
    resolution: int | None = None
    scheduler: str | None = None
    num_train_timesteps: int = 1000
    pipeline: str | None = None
    own: frozenset[str] = frozenset()
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "target_loss", "sail_threshold", "detection_threshold"):
            value = getattr(self, name)
            if value is None and name == "detection_threshold" and name not in self.own:
                continue  # a model without a calibrated threshold; one it names must be a number
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                self._fail(name, "a finite number")
            object.__setattr__(self, name, float(value))
        if self.guidance_scale < 1 or (self.guidance_scale == 1 and self.distilled_guidance is None):
            self._fail("guidance_scale", "above 1 (classifier-free guidance)" if self.distilled_guidance is None
                       else "1 or more (true classifier-free guidance; 1 samples the distilled model alone)")
        for name in ("target_loss", "sail_threshold"):
            if getattr(self, name) < 0:
                self._fail(name, "0 or more (it bounds a norm)")
        allowed = PARAMETERIZATIONS if not isinstance(self.scheduler, str) else (
            ("flow",) if prediction_type_of(self.scheduler, None) == "flow" else PREDICTION_TYPES)
        if self.prediction_type not in allowed:  # a diffusion scheduler cannot sample a flow model, nor the reverse
            self._fail("prediction_type", f"one of {', '.join(allowed)}")
        self._check_curve()
        for name in ("resolution", "num_train_timesteps"):
            value = getattr(self, name)
            if (value is not None or name == "num_train_timesteps") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                self._fail(name, "a positive whole number")
        for name in ("scheduler", "pipeline"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                self._fail(name, "a class name")
        unknown = set(self.own) - set(OWN_FIELDS)
        if unknown:
            raise ModelLoadError(f"{self.where('own')}: unknown field {sorted(unknown)[0]!r} (it may set "
                                 f"{', '.join(OWN_FIELDS)})")
        object.__setattr__(self, "own", frozenset(self.own))

    def _check_curve(self) -> None:
        """`transition_curve`: None, or at least two [timestep, d_t] pairs of finite numbers, timesteps falling within
        the schedule and d_t 0 or more; stored as a tuple of float pairs."""
        curve = self.transition_curve
        if curve is None:
            return
        what = (f"a list of at least two [timestep, d_t] pairs, timesteps falling from {self.num_train_timesteps} "
                "or less to 0 or more and each d_t 0 or more")
        if isinstance(curve, str | bytes) or not isinstance(curve, list | tuple) or len(curve) < 2:
            self._fail("transition_curve", what)
        pairs = []
        for pair in curve:
            if (isinstance(pair, str | bytes) or not isinstance(pair, list | tuple) or len(pair) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                           or v < 0 for v in pair)):
                self._fail("transition_curve", what)
            pairs.append((float(pair[0]), float(pair[1])))
        steps = [t for t, _ in pairs]
        if steps[0] > self.num_train_timesteps or any(a <= b for a, b in zip(steps, steps[1:], strict=False)):
            self._fail("transition_curve", what)
        object.__setattr__(self, "transition_curve", tuple(pairs))

    def where(self, name: str) -> str:
        """The file a field comes from, for messages."""
        file = _FILES.get(name, DEFAULTS_FILE)
        return str(self.folder / file) if self.folder is not None else f"the model's {file}"

    def _fail(self, name: str, what: str) -> NoReturn:
        shown = repr(getattr(self, name))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelLoadError(f"{self.where(name)}: {name} must be {what}, not {shown}")

    # ------------------------------------------------------------------------------------------- reading

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelDefaults:
        """The defaults of a diffusers pipeline folder: its diffmem.json over its family's, and its configs."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a model folder")
        index = _read(folder / "model_index.json")
        sched = _read(folder / "scheduler" / "scheduler_config.json")
        unet = _read(folder / "unet" / "config.json") or _read(folder / "transformer" / "config.json")
        vae = _read(folder / "vae" / "config.json")
        own = _read(folder / DEFAULTS_FILE)
        configs = _from_configs(index.get("_class_name"), sched, unet, vae.get("block_out_channels"))
        values = {name: own[name] for name in OWN_FIELDS if name in own}
        return cls(**{**configs, **values}, own=frozenset(own), folder=folder)  # unknown fields fail in the check

    @classmethod
    def for_model(cls, model: str | Path) -> ModelDefaults:
        """The defaults of a model `load_pipeline` takes (a name, a folder, a hub id), read before loading it;
        a hub id not downloaded gives the family-less defaults."""
        source = resolve_model(model)
        return cls.from_folder(source) if Path(source).is_dir() else cls()

    @classmethod
    def from_pipeline(cls, pipe: Any) -> ModelDefaults:
        """The family defaults of a pipeline built in memory, from its components' configs."""
        vae = getattr(pipe, "vae", None)
        channels = None if vae is None else vae.config.get("block_out_channels")
        unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        scheduler = getattr(pipe, "scheduler", None)
        sched = {} if scheduler is None else {"_class_name": type(scheduler).__name__, **scheduler.config}
        return cls(**_from_configs(type(pipe).__name__, sched, {} if unet is None else dict(unet.config), channels))

    @classmethod
    def of(cls, pipe: Any) -> ModelDefaults:
        """The defaults `load_pipeline` attached to `pipe`, else (a pipeline built by hand) its family's."""
        attached = getattr(pipe, _ATTRIBUTE, None)
        return attached if isinstance(attached, ModelDefaults) else cls.from_pipeline(pipe)

    def attach(self, pipe: Any) -> None:
        """Make these `pipe`'s defaults (`ModelDefaults.of(pipe)`)."""
        setattr(pipe, _ATTRIBUTE, self)

    # ------------------------------------------------------------------------------------------- writing

    def override(self, **values: Any) -> ModelDefaults:
        """A copy with `values` as the model's own (what `save` writes), checked like the rest."""
        unknown = sorted(set(values) - set(OWN_FIELDS))
        if unknown:
            raise TypeError(f"a model's own defaults are {', '.join(OWN_FIELDS)}, not {unknown[0]}")
        changes: dict[str, Any] = {**values, "own": self.own | set(values)}
        return dataclasses.replace(self, **changes)

    def own_values(self) -> dict[str, Any]:
        """The values the model names itself, as its diffmem.json holds them (the curve as a list of pairs)."""
        values = {name: getattr(self, name) for name in OWN_FIELDS if name in self.own}
        if values.get("transition_curve") is not None:
            values["transition_curve"] = [list(pair) for pair in values["transition_curve"]]
        return values

    def save(self, folder: str | Path) -> Path:
        """Write the model's own values to `folder`'s diffmem.json (read back by `from_folder`); returns it."""
        path = Path(folder) / DEFAULTS_FILE
        replace_file(path, json.dumps(self.own_values(), indent=2) + "\n")
        return path

    # ----------------------------------------------------------------------------------------- resolving

    @property
    def family_guidance(self) -> float:
        """The guidance scale of the model's family (diffusers' default for its pipeline class)."""
        return FAMILY_GUIDANCE.get(self.pipeline or "", SD_GUIDANCE_SCALE)

    @property
    def distilled_guidance(self) -> float | None:
        """The guidance value a guidance-distilled family (Flux) embeds in the denoiser input, else None."""
        return DISTILLED_GUIDANCE.get(self.pipeline or "")

    @property
    def own_target_loss(self) -> bool:
        """Whether the target loss is the model's own (else Wen et al.'s SD v1.4 value)."""
        return "target_loss" in self.own

    @property
    def own_sail_threshold(self) -> bool:
        """Whether the SAIL threshold is the model's own (else the authors' SD v1.4 value)."""
        return "sail_threshold" in self.own

    def resolve_guidance(self, value: float | None) -> float:
        """`value` when given, else the model's guidance scale."""
        return self.guidance_scale if value is None else float(value)

    def resolve_guided(self, value: float | None, reader: str) -> float:
        """`resolve_guidance` for `reader`, which reads the classifier-free guidance branches: a scale of 1 or less
        (a guidance-distilled model's own, Flux's true CFG off) has none, refused in one line."""
        scale = self.resolve_guidance(value)
        if scale <= 1:
            name = NAMES.get(FAMILIES.get(self.pipeline or "", ""), "the model")
            raise UnsupportedModelError(
                f"{reader} reads the classifier-free guidance branches, which {name} runs only with a true-CFG "
                f"scale above 1 (its default, {scale:g}, samples the distilled model alone): give --guidance above 1")
        return scale

    def resolve_target_loss(self, value: float | None) -> float:
        """`value` when given, else the model's mitigation target loss."""
        return self.target_loss if value is None else float(value)

    def resolve_sail_threshold(self, value: float | None) -> float:
        """`value` when given, else the model's SAIL threshold."""
        return self.sail_threshold if value is None else float(value)

    def transition_threshold(self, timestep: float) -> float:
        """The model's transition curve at `timestep`, linear between its points and flat beyond them (a model
        without one: ValueError, a caller's bug; read `transition_curve` first)."""
        if self.transition_curve is None:
            raise ValueError("this model has no transition curve")
        steps, values = zip(*reversed(self.transition_curve), strict=True)  # rising timesteps, as np.interp takes
        return float(np.interp(float(timestep), steps, values))

    def resolve_detection_threshold(self, value: float | None) -> float | None:
        """`value` when given, else the model's calibrated detection threshold (None if it has none)."""
        return self.detection_threshold if value is None else float(value)


def _read(path: Path) -> dict[str, Any]:
    """A JSON object file ({} when it is missing) checked against its schema, or one line naming the file."""
    return read_metadata(path)


def _from_configs(pipeline: Any, sched: dict[str, Any], unet: dict[str, Any], channels: Any) -> dict[str, Any]:
    """The fields that diffusers configs give (the scheduler's, the UNet's and the VAE's block widths; a pixel-space
    pipeline has no VAE)."""
    size = unet.get("sample_size")
    if isinstance(size, list | tuple) and size:
        size = size[0]
    factor = 2 ** (len(channels) - 1) if isinstance(channels, list | tuple) and channels else 8
    factor = 1 if pipeline in PIXEL_PIPELINES else factor  # a pixel-space denoiser's sample is the image
    return {"pipeline": pipeline, "guidance_scale": FAMILY_GUIDANCE.get(pipeline, SD_GUIDANCE_SCALE),
            "scheduler": sched.get("_class_name"),
            "prediction_type": prediction_type_of(sched.get("_class_name"), sched.get("prediction_type")),
            "num_train_timesteps": sched.get("num_train_timesteps", 1000),
            "resolution": size * factor if isinstance(size, int) and not isinstance(size, bool) else None}


def prediction_type_of(scheduler_class: str | None, configured: str | None) -> str:
    """What a scheduler's denoiser predicts: `flow` for a FlowMatch scheduler (its config names none), else its
    configured `prediction_type` (epsilon when unset)."""
    if isinstance(scheduler_class, str) and scheduler_class.startswith("FlowMatch"):
        return "flow"
    return configured or "epsilon"
