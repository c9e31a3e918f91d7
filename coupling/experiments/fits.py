"""Linear and exponential fits with their inference, and per-hyper-parameter correlations.

Used by ``coupling correlate`` (:mod:`coupling.experiments.correlate`; paper Fig. 1a, 8, 9, Tables 3-4)
and by the per-prompt study (:mod:`coupling.experiments.prompt_analysis`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

# Hyper-parameter columns, named as in the paper's Table 1 (see coupling.experiments.model_table).
HYPERPARAMS = ("coupling", "params_b", "layers", "d_model", "train_tokens_t")


@dataclass(frozen=True)
class LinearFit:
    """Ordinary least squares y = slope·x + intercept with its inference.

    ``p`` is the two-sided p-value of slope = 0 (t with n-2 degrees of freedom, identical
    to the F(1, n-2) test of the regression); ``stderr`` / ``intercept_stderr`` are the
    standard errors of slope and intercept, as in ``scipy.stats.linregress``.
    """

    slope: float
    intercept: float
    r: float
    r2: float
    p: float
    stderr: float
    intercept_stderr: float
    n: int
    alpha: float
    x_mean: float
    sxx: float        # sum (x - x_mean)^2
    resid_std: float  # s = sqrt(SSE / (n - 2))

    def predict(self, x) -> np.ndarray:
        """Fitted mean response at ``x`` (any shape)."""
        return self.intercept + self.slope * np.asarray(x, dtype=float)

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) (1-alpha) confidence band of the *mean response* at ``x``.

        yhat ± t_{1-alpha/2, n-2} · s · sqrt(1/n + (x - x_mean)^2 / Sxx).
        """
        x = np.asarray(x, dtype=float)
        t_crit = stats.t.ppf(1.0 - self.alpha / 2.0, self.n - 2)
        half = t_crit * self.resid_std * np.sqrt(1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        yhat = self.predict(x)
        return yhat - half, yhat + half


def _xy(x, y, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired 1-D finite samples of length >= min_n."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size}); pass paired samples")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x or y holds NaN/inf; drop incomplete rows before fitting")
    if x.size < min_n:
        raise ValueError(f"need at least {min_n} points to fit, got {x.size}")
    return x, y


def linear_fit(x, y, alpha: float = 0.05) -> LinearFit:
    """Least-squares line through paired samples ``x``, ``y`` (1-D, length n >= 3).

    Closed form: slope = Sxy/Sxx, r = Sxy/sqrt(Sxx·Syy), s² = (Syy − slope·Sxy)/(n−2).
    Raises ValueError when x or y is constant (r undefined).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    x, y = _xy(x, y, min_n=3)
    n = x.size
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    sxx, syy, sxy = dx @ dx, dy @ dy, dx @ dy
    if sxx == 0.0:
        raise ValueError("x is constant: a slope cannot be fitted "
                         "(choose another column or subset)")
    if syy == 0.0:
        raise ValueError("y is constant: the correlation is undefined")
    slope = sxy / sxx
    intercept = ym - slope * xm
    r = float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))
    df = n - 2
    # SSE = Syy (1 - r²); written this way it stays >= 0 under rounding.
    sse = syy * (1.0 - r) * (1.0 + r)
    stderr = np.sqrt(sse / df / sxx)
    t_stat = np.inf if stderr == 0.0 else slope / stderr
    p = 2.0 * stats.t.sf(abs(t_stat), df)
    return LinearFit(slope=float(slope), intercept=float(intercept), r=r, r2=r * r,
                     p=float(p), stderr=float(stderr),
                     intercept_stderr=float(stderr * np.sqrt(sxx / n + xm * xm)),
                     n=n, alpha=alpha, x_mean=float(xm), sxx=float(sxx),
                     resid_std=float(np.sqrt(sse / df)))


@dataclass(frozen=True)
class ExpFit:
    """y = a·exp(b·x) + c (Fig. 8); ``r2`` = 1 − SSE/SST on the original y scale.

    ``converged`` is False when the optimizer failed; a, b, c, r2 are then NaN and
    ``message`` says why.
    """

    a: float
    b: float
    c: float
    r2: float
    converged: bool
    message: str = ""

    def predict(self, x) -> np.ndarray:
        return self.a * np.exp(self.b * np.asarray(x, dtype=float)) + self.c


def _best_linear_ac(u: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """For fixed rate b the model is linear in (a, c): solve it, return (a, c, SSE)."""
    design = np.column_stack([np.exp(b * u), np.ones_like(u)])
    (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([a, c])
    return float(a), float(c), float(resid @ resid)


def exponential_fit(x, y, maxfev: int = 10_000) -> ExpFit:
    """Fit y = a·exp(b·x) + c with ``scipy.optimize.curve_fit`` (n >= 4 points).

    x is standardized to u = (x − mean)/std before fitting (coupling values are small and
    negative, scores are tens: raw scales make the problem badly conditioned); the start
    point comes from a grid over the rate with (a, c) solved exactly, then the parameters
    are mapped back to the original x. Failure returns ``ExpFit(converged=False)``.
    """
    x, y = _xy(x, y, min_n=4)
    xm, xs = x.mean(), x.std()
    if xs == 0.0:
        raise ValueError("x is constant: an exponential in x cannot be fitted")
    u = (x - xm) / xs
    grid = [b for b in np.linspace(-4.0, 4.0, 41) if b != 0.0]
    b0 = min(grid, key=lambda b: _best_linear_ac(u, y, b)[2])
    a0, c0, _ = _best_linear_ac(u, y, b0)

    def model(uu, a, b, c):
        return a * np.exp(b * uu) + c

    try:
        with warnings.catch_warnings():
            # Only the point estimate is used: an unestimable covariance is no failure.
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (a_u, b_u, c), _ = optimize.curve_fit(model, u, y, p0=(a0, b0, c0), maxfev=maxfev)
    except (RuntimeError, ValueError) as exc:
        nan = float("nan")
        return ExpFit(nan, nan, nan, nan, converged=False,
                      message=f"exponential fit did not converge: {exc}")
    # a·exp(b_u·(x − xm)/xs) = [a·exp(−b_u·xm/xs)]·exp((b_u/xs)·x)
    b = b_u / xs
    a = a_u * np.exp(-b_u * xm / xs)
    resid = y - model(u, a_u, b_u, c)
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / sst if sst > 0 else float("nan")
    return ExpFit(float(a), float(b), float(c), r2, converged=True)


def hyperparameter_correlations(table: pd.DataFrame, score_column: str,
                                columns: Sequence[str] = HYPERPARAMS,
                                alpha: float = 0.05) -> pd.DataFrame:
    """Linear correlation of each column in ``columns`` with ``score_column``.

    Per column, rows where that column or the score is missing are dropped (counted in
    ``n_dropped``). Returns one row per column (index ``hyperparam``) with
    ``n, n_dropped, r, r2, p, slope, intercept, note``; r/r2/p are NaN and ``note`` says
    why when the column is absent, has < 3 complete rows, or is constant.
    """
    if score_column not in table.columns:
        raise ValueError(f"score column {score_column!r} not in table; "
                         f"columns available: {', '.join(map(str, table.columns))}")
    rows = []
    for col in columns:
        row = {"hyperparam": col, "n": 0, "n_dropped": len(table), "r": np.nan, "r2": np.nan,
               "p": np.nan, "slope": np.nan, "intercept": np.nan, "note": ""}
        if col not in table.columns or col == score_column:
            row["note"] = "not in table" if col not in table.columns else "is the score"
            rows.append(row)
            continue
        pair = table[[col, score_column]].apply(pd.to_numeric, errors="coerce").dropna()
        row.update(n=len(pair), n_dropped=len(table) - len(pair))
        try:
            fit = linear_fit(pair[col], pair[score_column], alpha=alpha)
        except ValueError as exc:
            row["note"] = str(exc).split(":")[0]
        else:
            row.update(r=fit.r, r2=fit.r2, p=fit.p, slope=fit.slope, intercept=fit.intercept)
        rows.append(row)
    return pd.DataFrame(rows).set_index("hyperparam")
