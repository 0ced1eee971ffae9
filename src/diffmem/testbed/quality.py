"""Measure the testbed: does it reproduce planted images, generalise on held-out captions, and is it detectable?

Generation uses the issue's protocol (DDIM 50 steps, guidance 7.5, 4 seeds). A `Monitor` records every step's
magnitude during generation, so all-steps detection numbers come for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffmem.detect import initial_noise
from diffmem.evaluate import roc_auc, tpr_at_fpr
from diffmem.monitor import Monitor
from diffmem.testbed.scenes import Item, Splits, render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity, own_similarity


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], generations: int = 4, seed: int = 0, steps: int = 50,
             guidance: float = 7.5, batch_size: int = 256,
             progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, G, 3, H, W) in [0, 1] and the monitor's magnitudes (N, G, steps) for each prompt x seed.

    Generation g of every prompt starts from `initial_noise(pipe, generations, seed)[g]`, the same noise
    the detector scores, so images and detection scores belong together.
    """
    noise = initial_noise(pipe, generations, seed)
    per_batch = max(1, batch_size // generations)
    images, mags = [], []
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start : start + per_batch])
        latents = noise.repeat(len(chunk), 1, 1, 1).to(pipe.unet.device, pipe.unet.dtype)
        with Monitor(pipe) as mon:
            out = pipe(chunk, num_images_per_prompt=generations, num_inference_steps=steps,
                       guidance_scale=guidance, latents=latents, output_type="np").images
        images.append(np.moveaxis(out.reshape(len(chunk), generations, *out.shape[1:]), -1, 2))
        mags.append(mon.magnitudes().numpy().reshape(len(chunk), generations, -1))
        if progress is not None:
            progress(min(start + per_batch, len(prompts)), len(prompts))
    return np.concatenate(images), np.concatenate(mags)


@torch.no_grad()
def denoising_loss(pipe, items: list[Item], seed: int = 0, batch_size: int = 256) -> float:
    """Mean training loss (MSE to the scheduler's prediction target) of `pipe` on the renders of `items`, one
    seeded timestep and noise per item: how well the model fits data, e.g. held-out items."""
    from diffmem.testbed.recipe import encode_items
    from diffmem.train import _tokens, training_target

    dev = pipe.unet.device
    z = encode_items(pipe.vae, items, dev) * pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(z),), generator=gen)
    total = 0.0
    for start in range(0, len(z), batch_size):
        part = slice(start, start + batch_size)
        x0, eps, tt = z[part].to(dev), noise[part].to(dev), t[part].to(dev)
        noisy = pipe.scheduler.add_noise(x0, eps, tt)
        ids = _tokens(pipe.tokenizer, [i.caption for i in items[part]], dev)
        pred = pipe.unet(noisy, tt, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample.float()
        target = training_target(pipe.scheduler, x0, eps, tt).float()
        total += float(((pred - target) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / max(1, len(z))


def detection_table(mem_mags: np.ndarray, held_mags: np.ndarray) -> dict[str, dict[str, float]]:
    """AUC and TPR@1%/3%FPR (highest TPR at FPR <= target) for first-step n=1, n=4 and all-steps n=4."""
    settings = {
        "first_step_n1": lambda m: m[:, 0, 0],
        "first_step_n4": lambda m: m[:, :4, 0].mean(axis=1),
        "all_steps_n4": lambda m: m[:, :4, :].mean(axis=(1, 2)),
    }
    table = {}
    for name, reduce in settings.items():
        pos, neg = reduce(mem_mags), reduce(held_mags)
        table[name] = {
            "auc": roc_auc(pos, neg),
            "tpr_at_1fpr": tpr_at_fpr(pos, neg, 0.01),
            "tpr_at_3fpr": tpr_at_fpr(pos, neg, 0.03),
        }
    return table


def best_copy(images: np.ndarray, train_images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each generated image (N, G, ...) the highest copy similarity to any of `train_images`: (N, G)."""
    flat = images.reshape(-1, *images.shape[2:])
    best = np.full(len(flat), -np.inf, dtype=np.float32)
    for start in range(0, len(train_images), chunk):
        sim = copy_similarity(flat, train_images[start : start + chunk])
        best = np.maximum(best, sim.max(axis=1))
    return best.reshape(images.shape[:2])


def alignment(images: np.ndarray, items: list[Item]) -> np.ndarray | None:
    """Per generation: does the image show its caption (the testbed's attribute classifier)? (N, G) bools."""
    from diffmem.testbed.alignment import aligned

    flat = images.reshape(-1, *images.shape[2:])
    scenes = [i.scene for i in items for _ in range(images.shape[1])]
    try:
        return np.asarray(aligned(flat, scenes)).reshape(images.shape[:2])
    except FileNotFoundError:  # no trained classifier yet (while the testbed itself is being built)
        return None


def quality_report(pipe, splits: Splits, n_heldout: int | None = None, generations: int = 4, seed: int = 0,
                   steps: int = 50, guidance: float = 7.5, batch_size: int = 256,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The testbed's quality figures: reproduction, held-out copying and alignment, and detection."""
    prog = progress or (lambda stage, i, n: None)
    planted: list[Item] = splits.planted
    heldout: list[Item] = splits.heldout[:n_heldout] if n_heldout else splits.heldout
    mem_imgs, mem_mags = generate(pipe, [i.caption for i in planted], generations, seed, steps, guidance,
                                  batch_size, lambda i, n: prog("memorized", i, n))
    held_imgs, held_mags = generate(pipe, [i.caption for i in heldout], generations, seed, steps, guidance,
                                    batch_size, lambda i, n: prog("heldout", i, n))
    own = render_many([i.scene for i in planted], [i.seed for i in planted])
    own_sim = own_similarity(mem_imgs, own)
    copies = (own_sim >= COPY_THRESHOLD).sum(axis=1)
    train_items = splits.planted + splits.stage2_unique + splits.stage1
    train_imgs = render_many([i.scene for i in train_items], [i.seed for i in train_items])
    held_best = best_copy(held_imgs, train_imgs)
    ok, mem_ok = alignment(held_imgs, heldout), alignment(mem_imgs, planted)
    return {
        "n_memorized": len(planted),
        "n_heldout": len(heldout),
        "generations": generations,
        "copy_threshold": COPY_THRESHOLD,
        "memorized_reproduced_2of4": float((copies >= 2).mean()),
        "memorized_reproduced_any": float((copies >= 1).mean()),
        "memorized_copy_rate_per_generation": float((own_sim >= COPY_THRESHOLD).mean()),
        "memorized_mean_similarity": float(own_sim.mean()),
        "heldout_reproduce_any_training_image": float((held_best >= COPY_THRESHOLD).any(axis=1).mean()),
        "heldout_max_similarity_mean": float(held_best.mean()),
        "heldout_aligned": None if ok is None else float(ok.mean()),
        "memorized_aligned": None if mem_ok is None else float(mem_ok.mean()),
        "detection": detection_table(mem_mags, held_mags),
        "_arrays": {"mem_imgs": mem_imgs, "held_imgs": held_imgs, "mem_mags": mem_mags, "held_mags": held_mags,
                    "own_sim": own_sim, "held_best": held_best},
    }
