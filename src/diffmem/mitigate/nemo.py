"""NeMo (Hintersdorf et al., NeurIPS 2024): find the few cross-attention value neurons that carry a memorized
prompt, and switch them off.

Following the authors' code (github.com/ml-research/localizing_memorization_in_diffusion_models,
`utils/activation_detection.py`, defaults of `3_detect_memorized_neurons.py`):
- Value layers: the `to_v` projection of every cross-attention module in the down blocks and the mid block (the
  authors' seven for Stable Diffusion). A neuron is an output channel of one of them; its activation for a prompt is
  the mean absolute `to_v` output over the 77 text positions (it depends on the text only).
- Memorized? The residuals of `generations` seeds (10) are compared pairwise (`diffmem.detectors.nemo`); only seeds
  whose highest MS-SSIM exceeds `threshold` (0.428) are looked at, and none means not memorized: nothing is done.
- Initial selection: neurons whose activation is more than `theta` standard deviations from its mean over
  non-memorized prompts (`NeuronStatistics`), plus the top-k activations of each layer; starting at theta 5 and
  k 0, theta drops by 0.25 (down to 1) and k grows by 1 until the residuals with those neurons off are no longer
  similar (MS-SSIM <= threshold) to the residuals with them on. Without statistics, top-k alone (the authors'
  `--no_theta`).
- Refinement: whole layers, then single neurons, are switched back on whenever the residuals stay dissimilar.
- Mitigation: the found neurons' outputs are multiplied by 0 (the authors' scaling factor) in both CFG halves at
  every step of an ordinary generation. Forward hooks do it; they are removed after the call.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffmem.config import MAX_GENERATIONS, MAX_SEED, setting
from diffmem.detectors.nemo import NEMO_THRESHOLD, max_pairwise_ssim, noise_residuals
from diffmem.errors import InputError
from diffmem.io.durable import replace_file
from diffmem.io.files import MB, open_user_file
from diffmem.measures.ssim import ms_ssim
from diffmem.mitigate.base import Calibrating, Mitigation, NoOptions, Outcome, Sampler
from diffmem.models.attention import cross_attention_names
from diffmem.models.conditioning import Conditioning, encode
from diffmem.models.denoiser import initial_noise
from diffmem.registry import NOT_VERIFIED

MAX_STATS_BYTES = 256 * MB
"""Largest neuron statistics file read (SD's are a few MB)."""
NEMO_GENERATIONS = 10
"""Seeds the authors compare per prompt."""
NEMO_SEED = 1
"""The authors' default seed."""


def value_layer_names(unet: Any) -> list[str]:
    """Names of the cross-attention modules in the down blocks and the mid block, in forward order."""
    names = [n.removesuffix(".processor") for n in cross_attention_names(unet) if not n.startswith("up_blocks")]
    if not names:
        raise InputError("this UNet has no cross-attention in its down or mid blocks, where NeMo looks for neurons")
    return names


def value_layers(unet: Any) -> list[Any]:
    """The cross-attention modules whose `to_v` neurons NeMo considers (see `value_layer_names`)."""
    return [unet.get_submodule(n) for n in value_layer_names(unet)]


@torch.no_grad()
def value_activations(pipe: Any, cond: Conditioning) -> list[torch.Tensor]:
    """Per value layer, each row's mean absolute activation over the text positions: (rows, neurons)."""
    out = []
    for attn in value_layers(pipe.unet):
        states = cond.prompt_embeds
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        out.append(attn.to_v(states).abs().float().mean(dim=1))
    return out


@dataclass
class NeuronStatistics:
    """Mean and standard deviation of every value neuron's activation over non-memorized prompts."""

    mean: list[torch.Tensor]
    std: list[torch.Tensor]

    @classmethod
    def fit(cls, pipe: Any, prompts: Sequence[str], batch_size: int = 64) -> NeuronStatistics:
        """The statistics of `prompts` (the authors use 50,000 LAION prompts for SD v1.4)."""
        if len(prompts) < 2:
            raise InputError("neuron statistics need at least 2 prompts")
        parts: list[list[torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            with torch.no_grad():
                parts.append(value_activations(pipe, encode(pipe, prompts[start : start + batch_size])))
        per_layer = [torch.cat(layer).cpu() for layer in zip(*parts, strict=True)]
        return cls([a.mean(dim=0) for a in per_layer], [a.std(dim=0) for a in per_layer])

    def save(self, path: Path) -> None:
        replace_file(path, lambda tmp: torch.save({"mean": self.mean, "std": self.std}, tmp))

    @classmethod
    def load(cls, path: Path | str) -> NeuronStatistics:
        try:
            with open_user_file(path, "neuron statistics file", MAX_STATS_BYTES) as f:
                raw = io.BytesIO(f.read())
            data = torch.load(raw, weights_only=True)
            return cls(list(data["mean"]), list(data["std"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise InputError(f"{path} is not a neuron statistics file ({exc})") from None


Neurons = list[list[int]]
"""Per value layer, the indices of the neurons switched off."""


@contextmanager
def deactivated(unet: Any, neurons: Neurons, factor: float = 0.0) -> Iterator[None]:
    """Multiply the chosen value neurons' outputs by `factor` for the duration of the context (forward hooks,
    removed on exit, however it exits)."""
    handles = []
    for attn, indices in zip(value_layers(unet), neurons, strict=True):
        if indices:
            index = torch.tensor(sorted(set(indices)), dtype=torch.long)

            def scale(_module: Any, _args: Any, output: torch.Tensor, index: torch.Tensor = index) -> torch.Tensor:
                output = output.clone()
                output[..., index.to(output.device)] *= factor
                return output

            handles.append(attn.to_v.register_forward_hook(scale))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Localization:
    """NeMo's result for one prompt: the neurons found, the seeds looked at, and the MS-SSIM (residuals with the
    neurons off vs on) after the initial selection and after refinement. `memorized` False: nothing to do."""

    prompt: str
    neurons: Neurons
    initial: Neurons = field(default_factory=list)
    memorized: bool = True
    initial_ssim: float | None = None
    refined_ssim: float | None = None
    seeds: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(layer) for layer in self.neurons)

    def to_dict(self) -> dict[str, Any]:
        return {"neurons": self.neurons, "initial_neurons": self.initial, "memorized": self.memorized,
                "initial_ssim": self.initial_ssim, "refined_ssim": self.refined_ssim, "seeds": self.seeds,
                "count": self.count}


class NoiseResiduals:
    """Residuals of one prompt on fixed seeds, with any set of neurons off (one conditional denoiser call each)."""

    def __init__(self, pipe: Any, prompt: str, generations: int, seed: int, num_inference_steps: int) -> None:
        self.pipe, self.steps = pipe, num_inference_steps
        self.noise = initial_noise(pipe, generations, seed)
        with torch.no_grad():
            self.cond = encode(pipe, [prompt])

    @torch.no_grad()
    def __call__(self, neurons: Neurons | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
        noise = self.noise if seeds is None else self.noise[seeds]
        with deactivated(self.pipe.unet, neurons or [[] for _ in value_layers(self.pipe.unet)]):
            return noise_residuals(self.pipe, self.cond.expand(noise.shape[0]), noise, self.steps)


def _select(activations: list[torch.Tensor], stats: NeuronStatistics | None, theta: float, k: int) -> Neurons:
    """Out-of-distribution neurons (|a - mean| / std > theta) plus each layer's top-k activations."""
    chosen = []
    for layer, act in enumerate(activations):
        picked: set[int] = set()
        if stats is not None:
            z = (act.cpu() - stats.mean[layer]).abs() / stats.std[layer].clamp_min(1e-12)
            picked |= set((z > theta).nonzero().flatten().tolist())
        picked |= set(act.abs().topk(min(k, act.numel())).indices.tolist())
        chosen.append(sorted(picked))
    return chosen


def localize(pipe: Any, prompt: str, stats: NeuronStatistics | None = None, *, generations: int = NEMO_GENERATIONS,
             seed: int = NEMO_SEED, threshold: float = NEMO_THRESHOLD, num_inference_steps: int = 50,
             initial_theta: float = 5.0, theta_step: float = 0.25, min_theta: float = 1.0) -> Localization:
    """NeMo's neuron localisation for `prompt` (see the module docstring). Cost: one conditional denoiser call over
    the looked-at seeds per candidate set, a few dozen in all.

        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> stats = NeuronStatistics.fit(pipe, [item.caption for item in splits.heldout[:64]])  # non-memorized
        >>> found = localize(pipe, splits.planted[0].caption, stats, generations=2, threshold=0.9, min_theta=1.5)
        >>> found.memorized, found.count, [len(layer) for layer in found.neurons]  # switch them off: `deactivated`
        (True, 11, [6, 5, 0])
        >>> localize(pipe, splits.heldout[2].caption, stats, generations=2, threshold=0.9).memorized
        False
    """
    if generations < 2:
        raise InputError("NeMo needs at least 2 seeds to compare")
    residuals = NoiseResiduals(pipe, prompt, generations, seed, num_inference_steps)
    plain = residuals()
    look = max_pairwise_ssim(plain).cpu() > threshold
    if not bool(look.any()):
        return Localization(prompt, [[] for _ in value_layers(pipe.unet)], memorized=False)
    seeds = look.nonzero().flatten()
    plain = plain[seeds.to(plain.device)]

    def similarity(neurons: Neurons) -> float:
        return float(ms_ssim(plain, residuals(neurons, seeds)).max())

    activations = [a[0] for a in value_activations(pipe, residuals.cond)]
    widest = max(a.numel() for a in activations)
    theta, k = (initial_theta if stats is not None else float("inf")), 0
    refine_at = threshold
    while True:
        neurons = _select(activations, stats, theta, k)
        ssim = similarity(neurons)
        if ssim <= threshold:
            break
        if stats is not None and theta > min_theta:
            theta -= theta_step
        k += 1
        if theta == min_theta or k >= widest:
            refine_at = ssim
            break
    initial, initial_ssim = copy.deepcopy(neurons), ssim
    for layer in reversed(range(len(neurons))):  # whole layers back on
        if neurons[layer]:
            trial = copy.deepcopy(neurons)
            trial[layer] = []
            if similarity(trial) < refine_at:
                neurons = trial
    for layer in reversed(range(len(neurons))):  # single neurons back on
        for neuron in list(neurons[layer]):
            trial = copy.deepcopy(neurons)
            trial[layer].remove(neuron)
            if similarity(trial) < refine_at:
                neurons = trial
    return Localization(prompt, neurons, initial, True, initial_ssim, similarity(neurons), seeds.tolist())


@dataclass(frozen=True)
class NemoOptions(NoOptions):
    """NeMo's options: neuron statistics (a `NeuronStatistics` or the path of a saved one; None: top-k alone), the
    residuals' MS-SSIM threshold, and the seeds compared."""

    nemo_stats: Any = setting(None, option="--nemo-stats")
    nemo_threshold: float = setting(NEMO_THRESHOLD, option="--nemo-threshold")
    nemo_generations: int = setting(NEMO_GENERATIONS, option="--nemo-generations", ge=2, le=MAX_GENERATIONS)
    nemo_seed: int = setting(NEMO_SEED, option="--nemo-seed", ge=0, le=MAX_SEED)

    def statistics(self) -> NeuronStatistics | None:
        """`nemo_stats` as statistics (a path is loaded)."""
        stats = self.nemo_stats
        return stats if stats is None or isinstance(stats, NeuronStatistics) else NeuronStatistics.load(stats)


class NemoMitigation(Mitigation):
    """NeMo: the prompt's memorization neurons found (`localize`) and switched off for an ordinary generation."""

    name = "nemo"
    reads_unet = True
    Config = NemoOptions
    config: NemoOptions
    paper = "Hintersdorf et al., NeurIPS 2024"
    published = NOT_VERIFIED + ": Hintersdorf et al., NeurIPS 2024"
    cost = "a few dozen conditional evaluations over the seeds to localise, then a generation"
    rank = 90

    def apply(self, prompt: str, sampler: Sampler) -> Outcome:
        c = self.config
        found = localize(self.pipe, prompt, c.statistics(), generations=c.nemo_generations, seed=c.nemo_seed,
                         threshold=c.nemo_threshold, num_inference_steps=sampler.generation.num_inference_steps)
        with deactivated(self.pipe.unet, found.neurons):
            images, final = sampler(prompt=prompt)
        return Outcome(images, final, prompt, details=found.to_dict())

    calibrated = ("nemo_stats", "nemo_threshold")

    @classmethod
    def calibrate(cls, context: Calibrating) -> dict[str, Any]:
        """Neuron statistics of the non-memorized prompts (OUT/nemo_stats.pt) and the threshold: mean + 1 std of
        their pairwise residual MS-SSIM (the authors' recipe)."""
        from diffmem.measures.ssim import pairwise_ms_ssim

        stats_path = context.out / "nemo_stats.pt"
        if not stats_path.is_file():
            NeuronStatistics.fit(context.pipe, context.normal).save(stats_path)
        found: dict[str, Any] = {"nemo_stats": str(stats_path.resolve())}
        if "nemo_threshold" in context.known:
            return found
        context.log(f"calibration: pairwise residual MS-SSIM of {len(context.normal)} non-memorized prompts")
        sims = []
        for prompt in context.normal:
            pair = pairwise_ms_ssim(NoiseResiduals(context.pipe, prompt, NEMO_GENERATIONS, NEMO_SEED,
                                                   context.generation.num_inference_steps)())
            i, j = torch.triu_indices(pair.shape[0], pair.shape[0], 1)
            sims.append(pair[i, j].cpu())
        values = torch.cat(sims)
        return {**found, "nemo_threshold": float(values.mean() + values.std())}
