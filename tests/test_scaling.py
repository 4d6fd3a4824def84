"""The saturating power-law fit recovers known exponents, its uncertainty covers the truth, bad input fails clearly."""

from __future__ import annotations

import numpy as np
import pytest

from voco_lib.scaling import fit_power_law, power_law, size_for_target

X = np.array([100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 160_000], np.float64)  # pre-training volumes


@pytest.mark.parametrize("a,alpha,c", [(2.0, 0.3, 0.5), (50.0, 0.8, 0.05), (0.7, 0.12, 1.2)])
def test_noise_free_points_give_back_the_law(a, alpha, c):
    fit = fit_power_law(X, power_law(X, a, alpha, c))
    assert fit.alpha == pytest.approx(alpha, rel=1e-4)
    assert fit.a == pytest.approx(a, rel=1e-3)
    assert fit.c == pytest.approx(c, abs=1e-4)
    np.testing.assert_allclose(fit.predict(X), power_law(X, a, alpha, c), rtol=1e-6)


def test_the_standard_deviations_cover_the_truth_under_noise():
    """200 noisy replicates with known sigma: |alpha - truth| < 2 sd in about 95 % of them, and sd matches the spread."""
    a, alpha, c, noise = 3.0, 0.4, 0.3, 0.01
    rng = np.random.default_rng(0)
    fits = [fit_power_law(X, power_law(X, a, alpha, c) + rng.normal(0, noise, X.size), sigma=np.full(X.size, noise))
            for _ in range(200)]
    for name, truth in (("a", a), ("alpha", alpha), ("c", c)):  # a's sd is propagated from the rescaled fit
        values = np.array([getattr(f, name) for f in fits])
        sds = np.array([getattr(f, f"{name}_sd") for f in fits])
        assert 0.88 <= np.mean(np.abs(values - truth) < 2 * sds) <= 0.99, name
        assert np.median(sds) == pytest.approx(values.std(), rel=0.3), name
    alphas = np.array([f.alpha for f in fits])
    assert abs(alphas.mean() - alpha) < 3 * alphas.std() / np.sqrt(len(alphas)) + 0.01
    assert fits[0].covariance.shape == (3, 3) and fits[0].alpha_sd == pytest.approx(np.sqrt(fits[0].covariance[1, 1]))


def test_which_size_reaches_a_target_within_a_budget():
    fit = fit_power_law(X, power_law(X, 2.0, 0.5, 0.1))
    # 2/sqrt(x) + 0.1 <= 0.12  <=>  x >= 10,000
    assert size_for_target(fit, 0.12, [1_000, 5_000, 20_000, 160_000]) == 20_000
    assert size_for_target(fit, 0.12, [1_000, 5_000]) is None  # the budget does not reach it
    assert size_for_target(fit, 0.09, X) is None  # below the floor c


@pytest.mark.parametrize("x,y,match", [
    ([1, 2, 3], [3, 2, 1], "at least 4"),
    ([0, 1, 2, 3], [4, 3, 2, 1], "> 0"),
    ([-1, 1, 2, 3], [4, 3, 2, 1], "> 0"),
    ([1, 2, 3, np.nan], [4, 3, 2, 1], "finite"),
    ([1, 1, 2, 2], [4, 3, 2, 1], "distinct"),
    ([1, 2, 3, 4], [4, 3, 2], "one length"),
])
def test_bad_input_is_refused_with_the_fix(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y)
    with pytest.raises(ValueError, match="sigma"):
        fit_power_law([1, 2, 3, 4], [4, 3, 2, 1], sigma=[1, 1, 0, 1])
