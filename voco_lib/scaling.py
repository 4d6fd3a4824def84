"""Saturating power laws L(x) = a·x^(-alpha) + c, fitted to (size, loss) points, for "which size for which budget".

x is what grows (pre-training volumes, steps, parameters, FLOPs), y what falls with it (a loss, an error rate);
c is the floor no amount of x removes. The fit is scipy's `curve_fit` (least squares, optionally weighted by the
points' standard deviations) in log-x, and its covariance gives the standard deviation of each parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import curve_fit

MIN_POINTS = 4  # three parameters: with three points the fit is exact and its uncertainty undefined


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = a·x^(-alpha) + c; `*_sd` are one standard deviation from the fit's covariance (order a, alpha, c)."""

    a: float
    alpha: float
    c: float
    a_sd: float
    alpha_sd: float
    c_sd: float
    covariance: np.ndarray

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        return power_law(np.asarray(x, np.float64), self.a, self.alpha, self.c)

    def __str__(self) -> str:
        return (f"L(x) = {self.a:.4g}(±{self.a_sd:.2g}) · x^-{self.alpha:.3f}(±{self.alpha_sd:.3f}) "
                f"+ {self.c:.4g}(±{self.c_sd:.2g})")


def power_law(x: np.ndarray, a: float, alpha: float, c: float) -> np.ndarray:
    return a * np.power(x, -alpha) + c


def _check(x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None) -> None:
    if x.ndim != 1 or x.shape != y.shape or (sigma is not None and sigma.shape != x.shape):
        raise ValueError(f"fit_power_law: x, y (and sigma) must be 1-D of one length, got shapes {x.shape}, {y.shape}"
                         f"{'' if sigma is None else ', ' + str(sigma.shape)}")
    if len(x) < MIN_POINTS:
        raise ValueError(f"fit_power_law: {len(x)} points cannot fit 3 parameters with an uncertainty; "
                         f"measure at least {MIN_POINTS} sizes")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any():
        raise ValueError("fit_power_law: every x must be finite and > 0 (a size) and every y finite; "
                         "drop the zero-size point (it is the from-scratch baseline, not a point on the curve)")
    if len(np.unique(x)) < MIN_POINTS:
        raise ValueError(f"fit_power_law: only {len(np.unique(x))} distinct x; measure at least {MIN_POINTS} sizes")
    if sigma is not None and not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError("fit_power_law: sigma must be finite and > 0 (the points' standard deviations)")


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                  sigma: Sequence[float] | np.ndarray | None = None) -> PowerLawFit:
    """Least-squares fit of a·x^(-alpha) + c with alpha in [0, 5] and c ≥ 0 below min(y).

    x is rescaled by its geometric mean for the fit (a then refers to that scale and is mapped back), which keeps
    a and alpha nearly uncorrelated and the problem well conditioned for x spanning decades.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s = None if sigma is None else np.asarray(sigma, np.float64)
    _check(x, y, s)
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale
    y_min, y_max = float(y.min()), float(y.max())
    c0 = max(0.0, y_min - 0.1 * (y_max - y_min))
    small, large = np.argmin(u), np.argmax(u)
    ratio = (y[small] - c0) / max(y[large] - c0, 1e-12)
    alpha0 = float(np.clip(math.log(max(ratio, 1.0 + 1e-9)) / math.log(u[large] / u[small]), 0.05, 4.0))
    a0 = max(float(np.median(y - c0)), 1e-12)
    try:
        (b, alpha, c), cov = curve_fit(power_law, u, y, p0=(a0, alpha0, c0), sigma=s, absolute_sigma=s is not None,
                                       bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, max(y_min, 1e-12)]), maxfev=20_000)
    except RuntimeError as e:
        raise RuntimeError(f"fit_power_law: no convergence ({e}); the points may not fall like a power law") from None
    # a·x^-alpha = b·(x/scale)^-alpha  =>  a = b·scale^alpha; propagate (b, alpha) -> a by the Jacobian
    a = b * scale ** alpha
    jac = np.array([[scale ** alpha, b * scale ** alpha * math.log(scale), 0.0], [0, 1, 0], [0, 0, 1]])
    cov = jac @ cov @ jac.T
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return PowerLawFit(float(a), float(alpha), float(c), float(sd[0]), float(sd[1]), float(sd[2]), cov)


def size_for_target(fit: PowerLawFit, target: float, sizes: Sequence[float]) -> float | None:
    """The smallest of the affordable `sizes` (those within the budget) that the fit says reaches `target`, or None.

    Below the floor c no size reaches the target."""
    reached = [s for s in sorted(sizes) if float(fit.predict(s)) <= target]
    return reached[0] if reached else None
