"""The peer mitigations as `diffmem.mitigate.generate` methods: each turns one prompt and its initial noise into
images through one ordinary pipeline call (see `diffmem.mitigate.guard._sample`), changed as its authors change it.

- `attention` (Ren et al., ECCV 2024): the prompt's cross-attention re-scaled (`attention_rescale`).
- `sail` (Jeon et al., ICML 2025): the initial noise optimised (`sail`).
- `nemo` (Hintersdorf et al., NeurIPS 2024): the prompt's memorization neurons found and switched off (`nemo`).
Options (`method_options` of `generate`): c1; sail_threshold, sail_weight; nemo_stats (a `NeuronStatistics` or the
path of a saved one), nemo_threshold, nemo_generations, nemo_seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.detectors.nemo import NEMO_THRESHOLD
from diffmem.errors import InputError
from diffmem.mitigate.attention_rescale import REN_C1, rescaled_attention
from diffmem.mitigate.nemo import NEMO_GENERATIONS, NEMO_SEED, NeuronStatistics, deactivated, localize
from diffmem.mitigate.sail import SAIL_WEIGHT, sail
from diffmem.models.attention import cross_attention

OPTIONS = {"attention": {"c1"}, "sail": {"sail_threshold", "sail_weight"},
           "nemo": {"nemo_stats", "nemo_threshold", "nemo_generations", "nemo_seed"}}

Sample = Callable[..., tuple[Any, float]]
Outcome = tuple[Any, float, int, bool | None, dict[str, Any]]
"""images, final loss, optimisation steps, reached, details for the result row."""


def check_options(method: str, options: dict[str, Any]) -> None:
    """One error line for an option no method of this run reads."""
    unknown = set(options) - OPTIONS.get(method, set())
    if unknown:
        raise InputError(f"{', '.join(sorted(unknown))} do not apply to method {method!r}")


def neuron_statistics(value: NeuronStatistics | str | Path | None) -> NeuronStatistics | None:
    """`nemo_stats` as statistics (a path is loaded)."""
    return value if value is None or isinstance(value, NeuronStatistics) else NeuronStatistics.load(value)


def run_peer(method: str, pipe: Any, prompt: str, noise: Any, settings: dict[str, Any], sample: Sample, *,
             generations: int, seed: int, iters: int, lr: float, options: dict[str, Any]) -> Outcome:
    """Generate `prompt` from `noise` with peer mitigation `method`."""
    steps = settings["num_inference_steps"]
    if method == "attention":
        c1 = float(options.get("c1", REN_C1))
        with cross_attention(pipe.unet, rescaled_attention(pipe, prompt, c1)):
            images, final = sample(pipe, noise, settings, prompt=prompt)
        return images, final, 0, None, {"c1": c1}
    if method == "sail":
        res = sail(pipe, prompt, generations=generations, seed=seed, threshold=options.get("sail_threshold"),
                   iters=iters, lr=lr, weight=float(options.get("sail_weight", SAIL_WEIGHT)),
                   num_inference_steps=steps)
        images, _ = sample(pipe, res.noise.to(noise.dtype), settings, prompt=prompt)
        final = sum(res.losses) / len(res.losses)
        return images, final, res.iters, res.reached, {"sail_losses": res.losses,
                                                       "sail_initial_losses": res.initial_losses}
    if method == "nemo":
        found = localize(pipe, prompt, neuron_statistics(options.get("nemo_stats")),
                         generations=int(options.get("nemo_generations", NEMO_GENERATIONS)),
                         seed=int(options.get("nemo_seed", NEMO_SEED)),
                         threshold=float(options.get("nemo_threshold", NEMO_THRESHOLD)), num_inference_steps=steps)
        with deactivated(pipe.unet, found.neurons):
            images, final = sample(pipe, noise, settings, prompt=prompt)
        return images, final, 0, None, found.to_dict()
    raise InputError(f"unknown peer method {method!r}")
