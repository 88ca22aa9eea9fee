"""Bootstrap means and paired differences on numbers whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magic3d.ablation.stats import bootstrap_mean, bootstrap_means, paired_difference, paired_differences


def test_constant_data_gives_a_zero_width_interval() -> None:
    interval = bootstrap_mean([0.25] * 7)
    assert interval is not None
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.25, 0.25, 0.25, 7)


def test_missing_values_are_dropped_and_nothing_gives_none() -> None:
    interval = bootstrap_mean([1.0, None, float("nan"), 3.0])
    assert interval is not None and interval.n == 2 and interval.mean == 2.0
    assert bootstrap_mean([None, float("nan")]) is None
    assert bootstrap_mean([]) is None


def test_one_value_is_its_own_zero_width_interval() -> None:
    interval = bootstrap_mean([0.7])
    assert interval is not None and interval.low == interval.high == interval.mean == 0.7 and interval.n == 1


def test_interval_brackets_the_mean_and_lies_within_the_data() -> None:
    values = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    interval = bootstrap_mean(values)
    assert interval is not None
    assert interval.mean == pytest.approx(5 / 8)
    assert 0.0 <= interval.low < interval.mean < interval.high <= 1.0


def test_interval_width_matches_the_normal_theory_width() -> None:
    """For n = 200 draws the bootstrap distribution of the mean is close to normal with sd
    s / sqrt(n): the 95 % interval's half width is 1.96 s / sqrt(n) within 10 % (the
    bootstrap's sd uses the 1/n variance, and 10,000 resamples leave ~1 % Monte-Carlo error)."""
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, 0.5, size=200)
    interval = bootstrap_mean(values)
    expected = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.half_width == pytest.approx(expected, rel=0.10)


def test_same_seed_same_interval_other_seed_other_resamples() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    assert bootstrap_mean(values, seed=4) == bootstrap_mean(values, seed=4)
    assert not np.array_equal(bootstrap_means(np.asarray(values), 50, seed=1),
                              bootstrap_means(np.asarray(values), 50, seed=2))


def test_intervals_cover_the_true_mean_at_about_the_nominal_rate() -> None:
    """400 data sets of 40 draws from N(1, 2^2), each with its own 95 % interval: the
    true mean 1 should be covered ~95 % of the time. The binomial sd of the rate over 400 sets
    is 1.1 %, and the percentile bootstrap under-covers by ~1 % at n = 40, so [0.90, 0.98]
    holds a correct method with a wide margin while a wrong quantile (e.g. 68 %) fails."""
    rng = np.random.default_rng(1234)
    covered = [bootstrap_mean(rng.normal(1.0, 2.0, size=40), n_resamples=2000, seed=i).covers(1.0)
               for i in range(400)]
    assert 0.90 <= np.mean(covered) <= 0.98


def test_a_paired_shift_of_exactly_d_gives_mean_d_with_zero_width() -> None:
    """A variant that is the baseline plus d on every (prompt, seed) pair: every difference is
    d, however much the pairs differ from each other."""
    rng = np.random.default_rng(0)
    keys = [(f"prompt {i}", seed) for i in range(6) for seed in (0, 1)]
    baseline = {k: float(v) for k, v in zip(keys, rng.uniform(0, 1, len(keys)))}
    variant = {k: v + 0.125 for k, v in baseline.items()}
    interval = paired_difference(variant, baseline)
    assert interval.mean == pytest.approx(0.125, abs=1e-12)  # float sums of exact binary fractions
    assert interval.high - interval.low == pytest.approx(0.0, abs=1e-12)
    assert interval.n == len(keys)


def test_pairing_removes_prompt_variation() -> None:
    """Prompts that differ by a lot (0, 10, 20, ...) and a shift of 1 with small noise: the
    unpaired difference of means is lost in the prompt spread, the paired one is not."""
    rng = np.random.default_rng(5)
    baseline = {(i, 0): 10.0 * i for i in range(10)}
    variant = {k: v + 1.0 + rng.normal(0, 0.1) for k, v in baseline.items()}
    paired = paired_difference(variant, baseline)
    assert paired.covers(1.0) and paired.low > 0.5
    assert bootstrap_mean(list(variant.values())).covers(bootstrap_mean(list(baseline.values())).mean)


def test_pairs_need_both_values() -> None:
    baseline = {("a", 0): 1.0, ("b", 0): None, ("c", 0): 2.0, ("d", 0): 4.0}
    variant = {("a", 0): 2.0, ("b", 0): 5.0, ("c", 0): None, ("e", 0): 1.0}
    assert paired_differences(variant, baseline).tolist() == [1.0]
    assert paired_difference({("x", 0): 1.0}, baseline) is None


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean([1.0, 2.0], n_resamples=0)
