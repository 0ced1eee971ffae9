"""Plots of detection scores: the ROC curve (linear and log FPR) and the score histograms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffmem.errors import InputError
from diffmem.measures.detection import _NEG_NAME, _POS_NAME, Scores, _operating_point, _roc, roc_auc, split_finite

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_POS_COLOR, _NEG_COLOR = "#d62728", "#1f77b4"
_MARKS = ((0.01, "o", "#2ca02c"), (0.03, "s", "#ff7f0e"))


def _plot_inputs(pos: Scores, neg: Scores) -> tuple[np.ndarray, np.ndarray, str]:
    """Finite pos/neg scores for a plot and a legend title with the group sizes and any dropped rows."""
    pos_f, pos_dropped = split_finite(pos, _POS_NAME)
    neg_f, neg_dropped = split_finite(neg, _NEG_NAME)
    if pos_f.size == 0 or neg_f.size == 0:
        raise InputError("cannot plot: memorized and non-memorized prompts each need a finite score")
    dropped = pos_dropped + neg_dropped
    caption = f"{pos_f.size} memorized, {neg_f.size} non-memorized"
    if dropped:
        caption += f"\n({dropped} rows without a finite score not shown)"
    return pos_f, neg_f, caption


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as an image (format from the suffix), creating the parent folder."""
    from diffmem.io.durable import save_figure

    return save_figure(fig, path, dpi=150)  # constrained layout already fits everything in the figure


def _draw_roc(ax: Axes, fpr: np.ndarray, tpr: np.ndarray, auc: float, log_x: bool, n_neg: int) -> None:
    """One ROC panel with the chance line and the 1%/3% FPR operating points marked."""
    x = fpr
    if log_x:
        floor = 0.5 / n_neg  # FPR 0 cannot be shown on a log axis: draw it at half the smallest non-zero FPR
        x = np.maximum(fpr, floor)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
        diag = np.geomspace(floor, 1.0, 200)
        ax.plot(diag, diag, color="0.6", lw=0.8, ls=":")
    else:
        ax.set_xlim(0, 1)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="chance")
    ax.plot(x, tpr, color="black", lw=1.6, label=f"ROC (AUC = {auc:.3f})")
    for rate, marker, color in _MARKS:
        i = _operating_point(fpr, tpr, rate)
        ax.axvline(rate, color=color, lw=0.8, ls="--", alpha=0.6)
        ax.plot(x[i], tpr[i], marker=marker, color=color, ms=7, ls="none", clip_on=False, zorder=3,
                label=f"TPR@{rate:.0%}FPR = {tpr[i]:.3f} (FPR {fpr[i]:.3f})")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("true positive rate")
    ax.grid(True, which="major", alpha=0.3)


def plot_roc(
    pos: Scores, neg: Scores, path: str | Path, title: str | None = None, *, log_x: bool = True
) -> Path:
    """Save the ROC curve with AUC and the 1%/3% FPR points (convention: FPR <= target) in the legend.

    With ``log_x`` (default) a second panel shows the FPR axis on a log scale, where the low-FPR region that
    matters for detection is visible. Returns the path written.
    """
    pos_f, neg_f, caption = _plot_inputs(pos, neg)
    fpr, tpr = _roc(pos_f, neg_f)
    auc = roc_auc(pos_f, neg_f)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11 if log_x else 5.5, 5), layout="constrained")
    axes = fig.subplots(1, 2 if log_x else 1, squeeze=False)[0]
    for ax, log in zip(axes, (False, True), strict=False):
        _draw_roc(ax, fpr, tpr, auc, log, neg_f.size)
    axes[0].legend(loc="lower right", fontsize=8, title=caption, title_fontsize=8)
    fig.suptitle(title or "Memorization detection ROC")
    return _save(fig, path)


def plot_histogram(
    pos: Scores,
    neg: Scores,
    path: str | Path,
    threshold: float | None = None,
    title: str | None = None,
    bins: int = 50,
) -> Path:
    """Save overlaid score histograms (density) of memorized and non-memorized prompts, with the threshold
    line if given, to show how well a threshold separates the groups. Returns the path written."""
    pos_f, neg_f, caption = _plot_inputs(pos, neg)
    edges = np.histogram_bin_edges(np.concatenate([pos_f, neg_f]), bins=bins).tolist()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for arr, color, name in ((neg_f, _NEG_COLOR, "non-memorized"), (pos_f, _POS_COLOR, "memorized")):
        ax.hist(arr, bins=edges, density=True, color=color, alpha=0.35, label=name)
        ax.hist(arr, bins=edges, density=True, color=color, histtype="step", lw=1.2)
    if threshold is not None:
        flagged = float(np.mean(pos_f >= threshold))
        fpr = float(np.mean(neg_f >= threshold))
        ax.axvline(threshold, color="black", ls="--", lw=1.2,
                   label=f"threshold = {threshold:.4g} (TPR {flagged:.3f}, FPR {fpr:.3f})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title or "Detection scores")
    ax.legend(fontsize=8, title=caption, title_fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
