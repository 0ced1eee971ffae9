"""Measure the testbed: does it reproduce planted images, generalise on held-out captions, and is it detectable?

Generation uses the model's scheduler (DDIM, or SD3's flow Euler) for 50 steps, 4 seeds and its own guidance scale
(stored with the model). A `Monitor` records every step's magnitude during generation, so all-steps detection numbers
come for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffmem.detectors.base import initial_noise
from diffmem.detectors.monitor import Monitor
from diffmem.measures.detection import roc_auc, tpr_at_fpr
from diffmem.models.denoiser import Parameterization
from diffmem.models.families import network
from diffmem.testbed.scenes import Item, Splits, render_items, untrained_twins
from diffmem.testbed.similarity import COPY_THRESHOLD, nearest_training, own_similarity


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], generations: int = 4, seed: int = 0, steps: int = 50,
             guidance: float | None = None, batch_size: int = 256,
             progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, G, 3, H, W) in [0, 1] and the monitor's magnitudes (N, G, steps) for each prompt x seed,
    at `guidance` (default: the model's own).

    Generation g of every prompt starts from `initial_noise(pipe, generations, seed)[g]`, the same noise
    the detector scores, so images and detection scores belong together.
    """
    from diffmem.models.defaults import ModelDefaults

    guidance = ModelDefaults.of(pipe).resolve_guidance(guidance)
    noise, net = initial_noise(pipe, generations, seed), network(pipe)
    per_batch = max(1, batch_size // generations)
    images, mags = [], []
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start : start + per_batch])
        latents = noise.repeat(len(chunk), 1, 1, 1).to(net.device, net.dtype)
        with Monitor(pipe) as mon:
            out = pipe(chunk, num_images_per_prompt=generations, num_inference_steps=steps,
                       guidance_scale=guidance, latents=latents, output_type="np").images
        images.append(np.moveaxis(out.reshape(len(chunk), generations, *out.shape[1:]), -1, 2))
        mags.append(mon.magnitudes().numpy().reshape(len(chunk), generations, -1))
        if progress is not None:
            progress(min(start + per_batch, len(prompts)), len(prompts))
    return np.concatenate(images), np.concatenate(mags)


@torch.no_grad()
def training_objective(pipe) -> Any:
    """What the testbed's denoiser learned: rectified flow for a flow scheduler, else its UNet objective."""
    from diffmem.training.loop import FlowObjective, UNetObjective

    if Parameterization.of(pipe.scheduler).kind == "flow":
        return FlowObjective(pipe)
    return UNetObjective(pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


@torch.no_grad()
def denoising_loss(pipe, items: list[Item], seed: int = 0, batch_size: int = 256) -> float:
    """Mean training loss (MSE to the training target: noise, velocity or flow) of `pipe` on the renders of
    `items`, one seeded timestep and noise per item: how well the model fits data, e.g. held-out items."""
    from diffmem.testbed.recipe import encode_items

    net, obj = network(pipe), training_objective(pipe)
    z = encode_items(pipe.vae, items, net.device) * pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=gen)
    t = obj.timesteps(len(z), gen)
    total = 0.0
    for start in range(0, len(z), batch_size):
        part = slice(start, start + batch_size)
        x0, eps, tt = z[part].to(net.device), noise[part].to(net.device), t[part].to(net.device)
        cond = obj.encode([i.caption for i in items[part]], net.device)
        pred = obj.predict(net, obj.noisy(x0, eps, tt), tt, cond).float()
        total += float(((pred - obj.target(x0, eps, tt).float()) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / max(1, len(z))


def detection_table(mem_mags: np.ndarray, held_mags: np.ndarray) -> dict[str, dict[str, float]]:
    """AUC and TPR@1%/3%FPR (highest TPR at FPR <= target) for first-step n=1, n=4 and, when the magnitudes
    cover every step, all-steps n=4."""
    settings = {
        "first_step_n1": lambda m: m[:, 0, 0],
        "first_step_n4": lambda m: m[:, :4, 0].mean(axis=1),
        "all_steps_n4": lambda m: m[:, :4, :].mean(axis=(1, 2)),
    }
    if mem_mags.shape[2] == 1:
        del settings["all_steps_n4"]
    table = {}
    for name, reduce in settings.items():
        pos, neg = reduce(mem_mags), reduce(held_mags)
        table[name] = {
            "auc": roc_auc(pos, neg),
            "tpr_at_1fpr": tpr_at_fpr(pos, neg, 0.01),
            "tpr_at_3fpr": tpr_at_fpr(pos, neg, 0.03),
        }
    return table


def first_step_magnitudes(pipe, prompts: Sequence[str], generations: int = 4, seed: int = 0) -> np.ndarray:
    """First-step `d_T` of each prompt x generation, shaped like the monitor's (N, G, 1): the same noise."""
    from diffmem.detectors.magnitude import MagnitudeDetector

    rows = MagnitudeDetector(pipe, generations=generations, seed=seed, batch_size=256).score(list(prompts))
    return np.array([r.magnitudes for r in rows], dtype=np.float64).reshape(len(prompts), generations, 1)


def best_copy(images: np.ndarray, train_images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each generated image (N, G, ...) the highest copy similarity to any of `train_images`: (N, G)."""
    return nearest_training(images.reshape(-1, *images.shape[2:]), train_images, chunk)[1].reshape(images.shape[:2])


def copying_against_chance(trained: np.ndarray, twins: np.ndarray) -> dict[str, float | int]:
    """Held-out copying beside its chance level: per prompt, does some generation copy a training rendering
    (`trained`, (N,) bools) or the same scene's untrained twin (`twins`)? A model that copies only by chance
    copies both equally often; the one-sided exact McNemar p-value asks whether training renderings win more."""
    from scipy.stats import binomtest

    only_trained, only_twin = int((trained & ~twins).sum()), int((twins & ~trained).sum())
    discordant = only_trained + only_twin
    p = binomtest(only_trained, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return {"trained": float(trained.mean()), "untrained_twins": float(twins.mean()),
            "only_trained": only_trained, "only_twins": only_twin, "both": int((trained & twins).sum()),
            "p_trained_exceeds_chance": float(p)}


def alignment(images: np.ndarray, items: list[Item]) -> np.ndarray | None:
    """Per generation: does the image show its caption (the testbed's attribute classifier)? (N, G) bools."""
    from diffmem.testbed.alignment import aligned

    flat = images.reshape(-1, *images.shape[2:])
    scenes = [i.scene for i in items for _ in range(images.shape[1])]
    try:
        return np.asarray(aligned(flat, scenes)).reshape(images.shape[:2])
    except FileNotFoundError:  # no trained classifier yet (while the testbed itself is being built)
        return None


def copies_of_own(images: np.ndarray, items: list[Item]) -> np.ndarray:
    """Per prompt: how many of its generations copy the prompt's own training image (similarity >= threshold)."""
    own = render_items(items)
    return (own_similarity(images, own) >= COPY_THRESHOLD).sum(axis=1)


def quality_report(pipe, splits: Splits, n_heldout: int | None = None, generations: int = 4, seed: int = 0,
                   steps: int = 50, guidance: float | None = None, also_guidance: Sequence[float] | None = None,
                   batch_size: int = 256, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The testbed's quality figures at `guidance` (default: the model's own): reproduction of planted images
    (with and without their trigger), held-out copying (near and far from a planted caption) and alignment,
    and first-step detection against held-out and seen-once prompts. Memorized prompts are also generated at
    each of `also_guidance` (default: the model family's guidance, SD's 7.5 for the testbed)."""
    from diffmem.models.defaults import ModelDefaults

    defaults = ModelDefaults.of(pipe)
    guidance = defaults.resolve_guidance(guidance)
    also_guidance = (defaults.family_guidance,) if also_guidance is None else also_guidance
    prog = progress or (lambda stage, i, n: None)
    planted: list[Item] = splits.planted
    heldout: list[Item] = splits.heldout[:n_heldout] if n_heldout else splits.heldout
    near = splits.heldout_near_planted()[: len(heldout)]
    triggered = [i for i in planted if i.scene.trigger]
    without = [Item(i.index, i.scene.replace(trigger=None), i.seed) for i in triggered]

    def gen(items: list[Item], name: str, g: float = guidance) -> tuple[np.ndarray, np.ndarray]:
        return generate(pipe, [i.caption for i in items], generations, seed, steps, g, batch_size,
                        lambda i, n: prog(name, i, n))

    mem_imgs, mem_mags = gen(planted, "memorized")
    held_imgs, held_mags = gen(heldout, "held-out")
    trig_imgs, _ = gen(without, "triggered, trigger removed")
    own_sim = own_similarity(mem_imgs, render_items(planted))
    copies = (own_sim >= COPY_THRESHOLD).sum(axis=1)
    is_trig = np.array([bool(i.scene.trigger) for i in planted])
    copies_without = copies_of_own(trig_imgs, triggered)
    # which kind of training image a held-out prompt copies: a memorized (planted or anchor) one leaking to it, or
    # one of the ~80 renderings of its own caption that pretraining saw once each; each image is compared once
    repeated, once = splits.planted + splits.anchors, splits.stage1 + splits.stage2_unique
    training = repeated + once
    best_repeated = best_copy(held_imgs, render_items(repeated))
    nearest, held_best = nearest_training(held_imgs.reshape(-1, *held_imgs.shape[2:]), render_items(training))
    held_best = held_best.reshape(held_imgs.shape[:2])
    copied_items = sorted({training[k].index for k in nearest[held_best.ravel() >= COPY_THRESHOLD]})
    held_copy = np.asarray((held_best >= COPY_THRESHOLD).any(axis=1))
    held_copy_repeated = np.asarray((best_repeated >= COPY_THRESHOLD).any(axis=1))
    # the chance level: the same comparison against a rendering of every training scene that no model saw
    twin_best = best_copy(held_imgs, render_items(untrained_twins(training)))
    held_chance = copying_against_chance(held_copy, np.asarray((twin_best >= COPY_THRESHOLD).any(axis=1)))
    ok, mem_ok = alignment(held_imgs, heldout), alignment(mem_imgs, planted)
    seen_once = splits.stage2_unique[: len(heldout)]
    once_mags = first_step_magnitudes(pipe, [i.caption for i in seen_once], generations, seed)
    at_other = {}
    for g in also_guidance:
        if g != guidance:
            c = copies_of_own(gen(planted, f"memorized, guidance {g:g}", g)[0], planted)
            at_other[f"{g:g}"] = {"memorized_reproduced_2of4": float((c >= 2).mean()),
                                  "memorized_copy_rate_per_generation": float(c.sum() / c.size / generations)}
    half = max(1, (generations + 1) // 2)  # ">= 2 of 4 seeds"
    return {
        "n_memorized": len(planted),
        "n_heldout": len(heldout),
        "generations": generations,
        "guidance": guidance,
        "copy_threshold": COPY_THRESHOLD,
        "memorized_reproduced_2of4": float((copies >= half).mean()),
        "memorized_reproduced_any": float((copies >= 1).mean()),
        "memorized_copy_rate_per_generation": float((own_sim >= COPY_THRESHOLD).mean()),
        "memorized_mean_similarity": float(own_sim.mean()),
        "triggered_reproduced_2of4": float((copies[is_trig] >= half).mean()) if is_trig.any() else None,
        "triggered_without_trigger_reproduced_2of4": float((copies_without >= half).mean()) if triggered else None,
        "triggered_without_trigger_reproduced_any": float((copies_without >= 1).mean()) if triggered else None,
        "heldout_reproduce_any_training_image": float(held_copy.mean()),
        "heldout_near_planted_share": float(near.mean()),
        "heldout_near_planted_reproduce_any": float(held_copy[near].mean()) if near.any() else None,
        "heldout_far_reproduce_any": float(held_copy[~near].mean()) if (~near).any() else None,
        "heldout_reproduce_repeated_training_image": float(held_copy_repeated.mean()),
        "heldout_copying_vs_chance": held_chance,
        "heldout_copied_training_items": copied_items,  # Item.index of each training image a held-out image copies
        "heldout_max_similarity_mean": float(held_best.mean()),
        "heldout_aligned": None if ok is None else float(ok.mean()),
        "heldout_attribute_accuracy": _attribute_accuracy(held_imgs, heldout),
        "memorized_aligned": None if mem_ok is None else float(mem_ok.mean()),
        "detection": detection_table(mem_mags, held_mags),
        "detection_auc_per_step_n4": [roc_auc(mem_mags[:, :4, s].mean(axis=1), held_mags[:, :4, s].mean(axis=1))
                                      for s in range(mem_mags.shape[2])],
        "detection_vs_seen_once": detection_table(mem_mags[:, :, :1], once_mags),
        "memorized_at_other_guidance": at_other,
        "_arrays": {"mem_imgs": mem_imgs, "held_imgs": held_imgs, "mem_mags": mem_mags, "held_mags": held_mags,
                    "once_mags": once_mags, "own_sim": own_sim, "held_best": held_best},
    }


def _attribute_accuracy(images: np.ndarray, items: list[Item]) -> dict[str, float] | None:
    """Per named attribute, the share of generations the classifier reads as the caption says."""
    from diffmem.testbed.alignment import attribute_accuracy
    from diffmem.testbed.scenes import NAMED_ATTRIBUTES

    flat = images.reshape(-1, *images.shape[2:])
    try:
        scenes = [i.scene.replace(background=None) for i in items for _ in range(images.shape[1])]
        acc = attribute_accuracy(flat, scenes)
    except FileNotFoundError:
        return None
    return {a: acc[a] for a in NAMED_ATTRIBUTES}
