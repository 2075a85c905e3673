"""Paired differences merge - parent against hand computations."""

import math

import numpy as np
import pytest

from merger.eval.paired import item_value, mcnemar_exact, paired_difference


def test_the_paired_difference_is_the_mean_of_per_item_differences_with_its_standard_error():
    merge = {0: 1.0, 1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0}
    parent = {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0}
    d = paired_difference(merge, parent)
    # differences by hand: 0, 1, 0, 1, -1, 0 -> mean 1/6; sample variance (3 * (1/6)^2 + 2 * (5/6)^2
    # + (7/6)^2) / 5 = 17/30; standard error sqrt(17/30 / 6)
    assert d.items == 6
    assert d.mean == pytest.approx(1 / 6)
    assert d.stderr == pytest.approx(math.sqrt(17 / 30 / 6))
    # McNemar: 2 items only the merge passes, 1 only the parent: p = 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    assert d.mcnemar_p == pytest.approx(1.0)
    assert d.low <= d.mean <= d.high and not d.significant


def test_the_bootstrap_interval_is_the_seeded_percentiles_of_resampled_means():
    merge = {i: float(i % 3 == 0) for i in range(40)}
    parent = {i: float(i % 2 == 0) for i in range(40)}
    d = paired_difference(merge, parent, resamples=500, seed=7, level=0.9)
    diffs = np.array([merge[i] - parent[i] for i in range(40)])
    draws = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    low, high = np.quantile(diffs[draws].mean(axis=1), [0.05, 0.95])
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert paired_difference(merge, parent, resamples=500, seed=7, level=0.9) == d  # seeded: repeatable


def test_a_merge_that_loses_every_item_is_significant_and_mcnemar_counts_only_discordant_items():
    merge = {i: 0.0 for i in range(12)}
    parent = {i: 1.0 for i in range(12)}
    d = paired_difference(merge, parent)
    assert (d.mean, d.low, d.high, d.stderr) == (-1.0, -1.0, -1.0, 0.0)
    assert d.significant
    assert d.mcnemar_p == pytest.approx(2 / 2**12)  # 12 discordant items, all one way
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 1) == pytest.approx(2 * (1 + 6) / 64)


def test_scores_that_are_not_pass_or_fail_have_no_mcnemar_and_lists_count_as_their_mean():
    assert item_value([True, False, True, True]) == 0.75  # IFEval's instruction-level outcome of one prompt
    assert item_value(True) == 1.0
    d = paired_difference({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert d.mcnemar_p is None and d.mean == pytest.approx(0.125)


def test_models_scored_on_different_items_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_difference({0: 1.0, 1: 0.0}, {0: 1.0, 2: 0.0})
