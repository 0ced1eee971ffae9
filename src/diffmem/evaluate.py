"""Evaluate detection scores: ROC AUC, TPR at a fixed FPR, threshold calibration and plots.

Conventions (METHOD.md section 1): a prompt is flagged as memorized when ``score >= threshold``;
"TPR at x% FPR" is the highest TPR among ROC operating points whose FPR is <= x% (never the nearest point
above x%).
Positives are the memorized prompts, negatives the non-memorized (reference) prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffmem.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# sklearn and matplotlib are imported where used: together they take seconds to import, and the CLI should
# start fast for commands that never evaluate.

Scores = Iterable[float | None] | np.ndarray
"""Detection scores: a 1-D sequence of numbers; ``None``, NaN and inf mark a prompt without a usable score."""

TPR_CONVENTION = "highest TPR among ROC operating points with FPR <= target"
THRESHOLD_RULE = (
    "flag score >= threshold; threshold is just above the (floor(target*n)+1)-th largest reference score"
)

# 0.29 * 100 is inexact in floating point: this slack keeps an FPR of exactly k/n at the target.
_RATE_TOL = 1e-9
_POS_NAME = "memorized (positive)"
_NEG_NAME = "non-memorized (negative)"


def _as_array(scores: Scores, name: str) -> np.ndarray:
    """Convert scores to a 1-D float array, ``None`` becoming NaN."""
    if isinstance(scores, np.ndarray) and scores.dtype != object:
        values: Any = scores
    else:
        values = [math.nan if s is None else s for s in scores]
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the {name} scores must be numbers: {exc}") from exc
    if arr.ndim != 1:
        raise InputError(f"the {name} scores must be a flat list of numbers, got shape {arr.shape}")
    return arr


def split_finite(scores: Scores, name: str = "") -> tuple[np.ndarray, int]:
    """Return the finite scores as a float array and how many non-finite ones (None/NaN/inf) were dropped."""
    arr = _as_array(scores, name or "given")
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


def _finite(scores: Scores, name: str) -> np.ndarray:
    """Return the scores as a non-empty finite float array, or raise InputError (never drop silently)."""
    arr = _as_array(scores, name)
    if arr.size == 0:
        raise InputError(f"there are no {name} scores to evaluate")
    n_bad = int(arr.size - np.isfinite(arr).sum())
    if n_bad:
        raise InputError(
            f"{n_bad} of the {arr.size} {name} scores are missing or not finite; "
            "drop them first (evaluate_scores does so and reports the count)"
        )
    return arr


def _check_rate(value: float, name: str) -> float:
    """Validate a rate in [0, 1]."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"{name} must be a number between 0 and 1, got {value!r}")
    return rate


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ROC operating points (FPR, TPR) of finite pos/neg scores, none dropped as 'intermediate'."""
    from sklearn.metrics import roc_curve

    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    fpr, tpr, _ = roc_curve(y, np.concatenate([pos, neg]), drop_intermediate=False)
    return fpr, tpr


def _operating_point(fpr: np.ndarray, tpr: np.ndarray, target: float) -> int:
    """Index of the ROC point with the highest TPR among those with FPR <= target (lowest FPR on ties)."""
    allowed = np.flatnonzero(fpr <= target + _RATE_TOL)  # never empty: the curve starts at (0, 0)
    return int(allowed[np.argmax(tpr[allowed])])


def roc_auc(pos_scores: Scores, neg_scores: Scores) -> float:
    """Area under the ROC curve of memorized (pos) versus non-memorized (neg) scores; ties count one half."""
    from sklearn.metrics import roc_auc_score

    pos, neg = _finite(pos_scores, _POS_NAME), _finite(neg_scores, _NEG_NAME)
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def tpr_at_fpr(pos: Scores, neg: Scores, fpr: float) -> float:
    """TPR at a target FPR, by diffmem's convention: the highest TPR among ROC operating points whose FPR is
    <= ``fpr`` (a point just above the target is never taken, even when it is the nearest one)."""
    target = _check_rate(fpr, "fpr")
    fprs, tprs = _roc(_finite(pos, _POS_NAME), _finite(neg, _NEG_NAME))
    return float(tprs[_operating_point(fprs, tprs, target)])


def calibrate_threshold(reference_scores: Scores, target_fpr: float = 0.01) -> float:
    """Lowest threshold that flags (``score >= threshold``) at most ``target_fpr`` of the reference scores.

    Rule: with n reference (non-memorized) scores and k = floor(target_fpr * n), the threshold is the next
    float above the (k+1)-th largest reference score v, so exactly the references strictly above v are flagged
    (<= k of them; references tied at v stay unflagged). With fewer than 1/target_fpr references k is 0 and
    the threshold is just above the maximum (no reference flagged): usable, but the FPR estimate is coarse, so
    use more references. With target_fpr = 1 it is the minimum (everything flagged). Calibrated on the
    negatives of an evaluation, the TPR of this threshold equals ``tpr_at_fpr(pos, neg, target_fpr)``.
    """
    target = _check_rate(target_fpr, "target_fpr")
    ref = np.sort(_finite(reference_scores, "reference"))[::-1]
    k = math.floor(target * ref.size + _RATE_TOL)
    if k >= ref.size:
        return float(ref[-1])
    return float(np.nextafter(ref[k], np.inf))


@dataclass(frozen=True)
class Evaluation:
    """Detection quality: AUC, TPR at 1% and 3% FPR, and a threshold calibrated on the negatives."""

    auc: float
    tpr_at_1fpr: float
    tpr_at_3fpr: float
    threshold: float
    target_fpr: float
    n_pos: int
    n_neg: int
    n_dropped_pos: int = 0
    n_dropped_neg: int = 0
    negatives_median: float = float("nan")  # a typical non-memorized score: a model's mitigation target

    @property
    def n_dropped(self) -> int:
        """Rows left out because their score was missing or not finite."""
        return self.n_dropped_pos + self.n_dropped_neg

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every number, with the TPR convention and threshold rule stated next to them."""
        return {
            "auc": self.auc,
            "tpr_at_1fpr": self.tpr_at_1fpr,
            "tpr_at_3fpr": self.tpr_at_3fpr,
            "tpr_convention": TPR_CONVENTION,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "threshold_rule": THRESHOLD_RULE,
            "negatives_median": self.negatives_median,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "n_dropped": self.n_dropped,
            "n_dropped_pos": self.n_dropped_pos,
            "n_dropped_neg": self.n_dropped_neg,
        }

    def notes(self) -> list[str]:
        """Caveats a reader of the numbers must see: dropped rows and too few negatives for a stated FPR."""
        out = []
        if self.n_dropped:
            out.append(
                f"dropped {self.n_dropped} rows without a finite score "
                f"({self.n_dropped_pos} memorized, {self.n_dropped_neg} non-memorized)"
            )
        for rate in sorted({0.01, 0.03, self.target_fpr}):
            if 0 < rate * self.n_neg < 1 - _RATE_TOL:
                out.append(
                    f"only {self.n_neg} non-memorized prompts: at {rate:.0%} FPR no false positive is "
                    "allowed, so the TPR and threshold there are those of 0 false positives"
                )
        return out


def evaluate_scores(pos: Scores, neg: Scores, target_fpr: float = 0.01) -> Evaluation:
    """Evaluate memorized (pos) against non-memorized (neg) scores; non-finite scores are dropped and counted,
    and the threshold is calibrated on the negatives for ``target_fpr``."""
    target = _check_rate(target_fpr, "target_fpr")
    pos_f, pos_dropped = split_finite(pos, _POS_NAME)
    neg_f, neg_dropped = split_finite(neg, _NEG_NAME)
    for arr, dropped, name in ((pos_f, pos_dropped, _POS_NAME), (neg_f, neg_dropped, _NEG_NAME)):
        if arr.size == 0:
            extra = f" ({dropped} rows had no finite score)" if dropped else ""
            raise InputError(f"there are no {name} scores to evaluate{extra}")
    fprs, tprs = _roc(pos_f, neg_f)
    return Evaluation(
        auc=roc_auc(pos_f, neg_f),
        tpr_at_1fpr=float(tprs[_operating_point(fprs, tprs, 0.01)]),
        tpr_at_3fpr=float(tprs[_operating_point(fprs, tprs, 0.03)]),
        threshold=calibrate_threshold(neg_f, target),
        target_fpr=target,
        n_pos=int(pos_f.size),
        n_neg=int(neg_f.size),
        n_dropped_pos=pos_dropped,
        n_dropped_neg=neg_dropped,
        negatives_median=float(np.median(neg_f)),
    )


# ----------------------------------------------------------------------------------------------- plots

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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)  # constrained layout already fits everything in the figure
    return out


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
