"""Pictures of the testbed: training image next to its generations, with copy similarity."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def copy_grid(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path,
              threshold: float, title: str = "") -> Path:
    """Save a grid: one row per (label, training image, generations (G,3,H,W), similarities (G,)) tuple."""
    from matplotlib.figure import Figure

    n_gen = max(len(r[2]) for r in rows)
    fig = Figure(figsize=(1.25 * (n_gen + 1) + 2.6, 1.3 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), n_gen + 1, squeeze=False)
    for r, (label, train_img, gens, sims) in enumerate(rows):
        axes[r, 0].imshow(np.moveaxis(train_img, 0, -1).clip(0, 1), interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        for g in range(n_gen):
            ax = axes[r, g + 1]
            ax.imshow(np.moveaxis(gens[g], 0, -1).clip(0, 1), interpolation="nearest")
            copy = sims[g] >= threshold
            ax.set_title(f"{sims[g]:.2f}" + (" copy" if copy else ""), fontsize=7,
                         color="crimson" if copy else "black")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("training image", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from diffmem.io.durable import save_figure

    return save_figure(fig, path, dpi=110)
