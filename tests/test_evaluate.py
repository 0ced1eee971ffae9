"""Evaluation maths on hand-computed cases, threshold calibration guarantees, bad input and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffmem.errors import InputError
from diffmem.measures.detection import (
    Evaluation,
    calibrate_threshold,
    evaluate_scores,
    roc_auc,
    split_finite,
    tpr_at_fpr,
)
from diffmem.measures.plots import plot_histogram, plot_roc


@pytest.mark.parametrize(
    ("pos", "neg", "expected"),
    [
        ([3, 2], [1, 2.5], 3 / 4),  # pairs: 3>1, 3>2.5, 2>1, 2<2.5
        ([2, 1], [1, 0], 3.5 / 4),  # the tie 1 = 1 counts one half
        ([1], [1], 0.5),
        ([0, 1], [2, 3], 0.0),
    ],
)
def test_roc_auc_hand_computed(pos: list[float], neg: list[float], expected: float) -> None:
    assert roc_auc(pos, neg) == pytest.approx(expected)


def test_tpr_never_takes_the_nearest_point_above_the_target() -> None:
    # 20 negatives: ROC FPRs are multiples of 0.05. At target 0.04 the nearest point is FPR 0.05 with TPR 1.0,
    # but only FPR 0 is allowed, where one positive (100) of four is above every negative.
    neg = np.arange(20.0)
    pos = [100.0, 18.5, 18.6, 18.7]
    assert tpr_at_fpr(pos, neg, 0.04) == pytest.approx(0.25)
    assert tpr_at_fpr(pos, neg, 0.05) == pytest.approx(1.0)  # FPR equal to the target is allowed


def test_tpr_at_fpr_exact_rate_is_not_lost_to_rounding() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 false positives must still be allowed.
    neg = np.arange(100.0)
    pos = [70.5, 200.0]  # 70.5 is reached only with 29 false positives (71..99)
    assert tpr_at_fpr(pos, neg, 0.29) == pytest.approx(1.0)
    assert tpr_at_fpr(pos, neg, 0.28) == pytest.approx(0.5)


def test_tpr_at_fpr_keeps_collinear_roc_points() -> None:
    # Equal pos and neg give the points (k/4, k/4); sklearn's drop_intermediate would keep only the ends.
    scores = [1.0, 2.0, 3.0, 4.0]
    assert tpr_at_fpr(scores, scores, 0.6) == pytest.approx(0.5)


def test_low_level_metrics_reject_non_finite_scores() -> None:
    with pytest.raises(InputError, match="not finite"):
        roc_auc([1.0, math.nan], [0.0])
    with pytest.raises(InputError, match="not finite"):
        tpr_at_fpr([1.0], [0.0, None], 0.01)  # type: ignore[list-item]
    with pytest.raises(InputError, match="no memorized"):
        roc_auc([], [0.0])
    with pytest.raises(InputError, match="must be numbers"):
        roc_auc(["high"], [0.0])  # type: ignore[list-item]
    assert split_finite(np.array([1.0, None, math.inf, 2.0], dtype=object))[1] == 2


@pytest.mark.parametrize("target", [0.0, 0.01, 0.03, 0.05, 0.1, 0.29, 0.5])
def test_calibrated_threshold_keeps_empirical_fpr_at_or_below_target(target: float) -> None:
    rng = np.random.default_rng(1)
    ref = np.round(rng.normal(size=1000), 2)  # rounding creates many ties
    thr = calibrate_threshold(ref, target)
    k = math.floor(target * ref.size + 1e-9)
    flagged = int(np.sum(ref >= thr))
    assert flagged / ref.size <= target + 1e-12
    # Lowest such threshold: the next reference value below it would flag more than k.
    below = ref[ref < thr]
    assert np.sum(ref >= below.max()) > k


def test_calibration_with_ties_and_small_samples() -> None:
    tied = np.array([1.0] * 50 + [2.0] * 60)  # k = 1 but the top value is shared by 60 references
    thr = calibrate_threshold(tied, 0.01)
    assert thr > 2.0 and np.sum(tied >= thr) == 0
    small = np.arange(50.0)  # fewer than 1/0.01 references: nothing may be flagged
    thr = calibrate_threshold(small, 0.01)
    assert thr > 49.0 and thr == pytest.approx(49.0)
    assert calibrate_threshold([3.0, 1.0, 2.0], 1.0) == 1.0  # everything flagged
    thr = calibrate_threshold(np.arange(100.0), 0.03)  # k = 3: just above the 4th largest, 96
    assert 96.0 < thr < 97.0 and np.sum(np.arange(100.0) >= thr) == 3
    # 0.29 * 100 is 28.999999999999996 in floating point: 29 references must still be flagged.
    assert np.sum(np.arange(100.0) >= calibrate_threshold(np.arange(100.0), 0.29)) == 29


@pytest.mark.parametrize(
    ("scores", "target", "message"),
    [
        ([], 0.01, "no reference"),
        ([1.0, math.inf], 0.01, "not finite"),
        ([1.0], 1.5, "between 0 and 1"),
        ([1.0], "x", "between 0 and 1"),
    ],
)
def test_calibration_rejects_bad_input(scores: list[float], target: float, message: str) -> None:
    with pytest.raises(InputError, match=message):
        calibrate_threshold(scores, target)


def test_evaluate_scores_drops_and_counts_non_finite_rows() -> None:
    rng = np.random.default_rng(0)
    neg = list(rng.normal(0, 1, 300)) + [math.nan, math.inf]
    pos = list(np.round(rng.normal(3, 1, 200), 1)) + [None]
    ev = evaluate_scores(pos, neg)  # type: ignore[arg-type]
    assert (ev.n_pos, ev.n_neg, ev.n_dropped_pos, ev.n_dropped_neg, ev.n_dropped) == (200, 300, 1, 2, 3)
    finite_pos = np.array(pos[:-1], dtype=float)
    finite_neg = np.array(neg[:-2])
    assert ev.auc == pytest.approx(roc_auc(finite_pos, finite_neg))
    assert ev.tpr_at_3fpr == tpr_at_fpr(finite_pos, finite_neg, 0.03)
    # The calibrated threshold is the operating point the TPR convention picks.
    assert np.mean(finite_pos >= ev.threshold) == pytest.approx(ev.tpr_at_1fpr)
    assert np.mean(finite_neg >= ev.threshold) <= 0.01
    d = ev.to_dict()
    assert d["n_dropped"] == 3 and "FPR <= target" in d["tpr_convention"]
    json.dumps(d, allow_nan=False)
    assert any("dropped 3" in note for note in ev.notes())


def test_evaluate_scores_notes_too_few_negatives() -> None:
    ev = evaluate_scores([2.0, 3.0], [0.0, 1.0, 2.5])
    assert isinstance(ev, Evaluation)
    assert ev.tpr_at_1fpr == pytest.approx(0.5)  # no false positive allowed: only 3.0 is above every negative
    assert any("only 3 non-memorized" in note for note in ev.notes())


@pytest.mark.parametrize(
    ("pos", "neg", "message"),
    [
        ([], [1.0], "no memorized"),
        ([1.0], [math.nan, None], r"no non-memorized .*2 rows had no finite score"),
    ],
)
def test_evaluate_scores_rejects_empty_groups(pos: list, neg: list, message: str) -> None:
    with pytest.raises(InputError, match=message):
        evaluate_scores(pos, neg)


def test_plots_write_png_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    pos = list(rng.normal(3, 1, 100)) + [math.nan]
    neg = rng.normal(0, 1, 150)
    roc = plot_roc(pos, neg, tmp_path / "sub" / "roc.png", title="test")
    hist = plot_histogram(pos, neg, tmp_path / "hist.png", threshold=1.5)
    for path in (roc, hist):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(InputError, match="finite score"):
        plot_histogram([math.nan], neg, tmp_path / "bad.png")
