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
from typing import Any

import numpy as np

from diffmem.errors import InputError

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
        if isinstance(scores, str | bytes | dict):
            raise InputError(f"the {name} scores must be a list of numbers, not {type(scores).__name__}")
        values = [math.nan if s is None else s for s in scores]
        odd = next((s for s in values if isinstance(s, bool | str | bytes)), None)
        if odd is not None:  # float(True) is 1.0 and float("1") 1.0: a damaged row, not a score
            raise InputError(f"the {name} scores must be numbers, not {type(odd).__name__} ({odd!r:.40})")
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

        >>> from diffmem import detect, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> reference = [row.score for row in detect(pipe, [item.caption for item in splits.heldout[:100]])]
        >>> threshold = calibrate_threshold(reference, target_fpr=0.01)  # then flag prompts with score >= threshold
        >>> sum(score >= threshold for score in reference), round(threshold, 2)
        (1, 0.85)
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
    and the threshold is calibrated on the negatives for ``target_fpr``.

        >>> from diffmem import detect, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> splits = shipped_recipe().splits()  # the testbed's captions: planted (memorized) and held-out
        >>> memorized = [row.score for row in detect(pipe, [item.caption for item in splits.planted])]
        >>> held_out = [row.score for row in detect(pipe, [item.caption for item in splits.heldout[:128]])]
        >>> result = evaluate_scores(memorized, held_out, target_fpr=0.01)
        >>> round(result.auc, 2), round(result.tpr_at_1fpr, 2), result.n_pos, result.n_neg, result.notes()
        (0.96, 0.59, 64, 128, [])
    """
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
