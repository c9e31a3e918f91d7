"""Correlate per-model coupling with benchmark scores (paper Fig. 1a, 8, 9, Tables 3-4).

Pipeline: scan outputs -> one row per model (``load_results``) -> join with a score table
(``join_scores``) -> optional subset (``apply_subset``) -> linear / exponential fits and
per-hyper-parameter correlations -> ``correlation.csv``, ``joined.csv`` and figures
(``run_correlate``; CLI ``coupling correlate``).

Conventions
-----------
* *Coupling* is the negative of mis-coupling (paper Section 5.4), so it is <= 0 and larger
  (closer to 0) means stronger coupling. A scan's ``summary.parquet`` holds per-prompt
  ``depth_mis_coupling_mean`` (normalized m~, Eq. 14, averaged over layer pairs) and
  ``depth_mis_coupling_raw_mean`` (raw m, Eq. 13); a model's coupling is minus their mean
  over prompts. ``models.parquet`` (Ray runs) already holds the negated values in
  ``coupling_mean`` (normalized) and ``coupling_raw_mean`` (raw).
* Section 5.4 averages the raw m(A) for Fig. 1a, so ``coupling`` in the joined table is
  ``coupling_raw`` by default (``coupling_metric="normalized"`` picks the other).
* Hyper-parameter columns use the names of the paper's Table 1: ``params_b`` (billions),
  ``layers``, ``d_model``, ``train_tokens_t`` (trillions), ``fine_tuned``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

PAPER_TABLE = Path(__file__).resolve().parent / "data" / "paper_table1.csv"
HYPERPARAMS = ("coupling", "params_b", "layers", "d_model", "train_tokens_t")
# --by choice -> column of the joined table.
BY_COLUMNS = {"score": None, "params": "params_b", "layers": "layers",
              "d_model": "d_model", "train_tokens": "train_tokens_t"}
LABELS = {"coupling": "coupling (− mean mis-coupling)", "params_b": "parameters (B)",
          "layers": "layers", "d_model": "d_model", "train_tokens_t": "training tokens (T)",
          "openllm_score": "Open LLM Leaderboard score"}
# Columns a scan measures; on a join overlap the scan's value wins for these and the
# score table's (published, nominal) value wins for everything else.
MEASURED = ("coupling", "coupling_raw", "coupling_normalized", "coupling_std", "lss",
            "expodistance", "n_prompts")


# --------------------------------------------------------------------------- statistics

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


# --------------------------------------------------------------------------- loading

def _as_bool(series: pd.Series) -> pd.Series:
    """true/false/1/0/yes/no (any case) -> bool; anything else -> ValueError."""
    if series.dtype == bool:
        return series
    mapping = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "1.0": True, "0.0": False}
    text = series.astype(str).str.strip().str.lower()
    bad = sorted(set(text[~text.isin(mapping.keys())]))
    if bad:
        raise ValueError(f"column {series.name!r} must hold true/false, found {bad[:5]}")
    return text.map(mapping).astype(bool)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path)
    raise ValueError(f"{path}: expected a .csv or .parquet file or a scan output directory")


def _or_nan(value) -> float:
    return np.nan if value is None else float(value)


def aggregate_scan_dir(path: Path) -> pd.DataFrame:
    """One per-model row from a scan output dir (``manifest.json`` + ``summary.parquet``).

    coupling_normalized / coupling_raw = −mean over prompts of depth_mis_coupling_mean /
    depth_mis_coupling_raw_mean (NaN prompts skipped); coupling_std is the std over
    prompts of the normalized per-prompt value.
    """
    manifest_path, summary_path = path / "manifest.json", path / "summary.parquet"
    for p in (manifest_path, summary_path):
        if not p.exists():
            raise ValueError(f"{path}: missing {p.name}; pass a scan output dir, a dir with "
                             "models.parquet, or a per-model .csv/.parquet")
    info = json.loads(manifest_path.read_text()).get("model")
    if not isinstance(info, dict) or not info.get("id"):
        raise ValueError(f"{manifest_path}: needs a 'model' object with an 'id'")
    summary = pd.read_parquet(summary_path)

    def col_mean(name: str, sign: float = 1.0) -> float:
        return sign * float(summary[name].mean()) if name in summary.columns else np.nan

    n_params = info.get("n_params")
    row = {
        "model": str(info["id"]), "revision": info.get("revision"),
        "random_init": bool(info.get("random_init", False)),
        "params_b": _or_nan(n_params) / 1e9,
        "layers": _or_nan(info.get("n_layers")), "d_model": _or_nan(info.get("d_model")),
        "coupling_normalized": col_mean("depth_mis_coupling_mean", -1.0),
        "coupling_std": (float(summary["depth_mis_coupling_mean"].std())
                         if "depth_mis_coupling_mean" in summary.columns else np.nan),
        "coupling_raw": col_mean("depth_mis_coupling_raw_mean", -1.0),
        "lss": col_mean("lss"), "expodistance": col_mean("expodistance"),
        "n_prompts": int(summary["depth_mis_coupling_mean"].notna().sum())
        if "depth_mis_coupling_mean" in summary.columns else 0,
        "source": str(path),
    }
    return pd.DataFrame([row])


# models.parquet / per-model file column -> joined-table column
_MODEL_TABLE_RENAMES = {"coupling_mean": "coupling_normalized",
                        "coupling_raw_mean": "coupling_raw", "lss_mean": "lss",
                        "expodistance_mean": "expodistance"}


def normalize_model_table(df: pd.DataFrame, source: str = "") -> pd.DataFrame:
    """Bring a per-model table (models.parquet or Table-1 layout) to the joined names.

    ``params`` (a parameter count) becomes ``params_b`` (billions) unless ``params_b``
    exists. Coupling columns must be <= 0 (negated mis-coupling).
    """
    if "model" not in df.columns:
        raise ValueError(f"{source or 'per-model table'}: needs a 'model' column; "
                         f"has {', '.join(map(str, df.columns))}")
    out = df.rename(columns=_MODEL_TABLE_RENAMES).copy()
    if "params" in out.columns and "params_b" not in out.columns:
        out["params_b"] = pd.to_numeric(out["params"], errors="coerce") / 1e9
    out = out.drop(columns=[c for c in ("params",) if c in out.columns])
    for col in ("coupling_normalized", "coupling_raw"):
        if col in out.columns and (pd.to_numeric(out[col], errors="coerce") > 0).any():
            raise ValueError(f"{source}: {col} has positive values, but coupling is negative "
                             "mis-coupling (<= 0); the file seems to hold mis-coupling: negate it")
    out["model"] = out["model"].astype(str)
    if "random_init" in out.columns:
        out["random_init"] = _as_bool(out["random_init"])
    out["source"] = source
    return out


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Per-model rows from scan dirs, dirs with models.parquet, or per-model .csv/.parquet."""
    frames = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"results path {path} does not exist")
        if path.is_dir() and (path / "models.parquet").exists():
            frames.append(normalize_model_table(pd.read_parquet(path / "models.parquet"),
                                                str(path / "models.parquet")))
        elif path.is_dir():
            frames.append(aggregate_scan_dir(path))
        else:
            frames.append(normalize_model_table(_read_table(path), str(path)))
    if not frames:
        raise ValueError("no results given")
    table = pd.concat(frames, ignore_index=True)
    if "random_init" not in table.columns:
        table["random_init"] = False
    table["random_init"] = table["random_init"].fillna(False).astype(bool)
    return table


def select_coupling(table: pd.DataFrame, metric: str = "raw") -> pd.DataFrame:
    """Set ``coupling`` to ``coupling_raw`` or ``coupling_normalized`` (when present)."""
    if metric not in ("raw", "normalized"):
        raise ValueError(f"coupling metric must be 'raw' or 'normalized', got {metric!r}")
    out = table.copy()
    source = f"coupling_{metric}"
    if source in out.columns:
        out["coupling"] = pd.to_numeric(out[source], errors="coerce")
    return out


def load_scores(path: str | Path, id_column: str = "model") -> pd.DataFrame:
    """Score table (CSV or parquet) with a unique id column."""
    scores = _read_table(Path(path))
    if id_column not in scores.columns:
        raise ValueError(f"{path}: id column {id_column!r} not found (use --id-column); "
                         f"columns available: {', '.join(map(str, scores.columns))}")
    scores[id_column] = scores[id_column].astype(str)
    dup = scores[id_column][scores[id_column].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{path}: ids repeated in {id_column!r}: {dup[:5]}; make them unique")
    if "fine_tuned" in scores.columns:
        scores["fine_tuned"] = _as_bool(scores["fine_tuned"])
    return scores


@dataclass
class JoinReport:
    """Who matched: result ids without scores, score ids without results."""

    matched: list[str]
    unmatched_results: list[str]
    unmatched_scores: list[str]
    skipped_random_init: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"joined {len(self.matched)} model(s) with scores"]
        if self.unmatched_results:
            lines.append(f"  results without a score row ({len(self.unmatched_results)}): "
                         + ", ".join(self.unmatched_results))
        if self.unmatched_scores:
            lines.append(f"  score rows without results: {len(self.unmatched_scores)}")
        if self.skipped_random_init:
            lines.append("  skipped random-init results (a benchmark score belongs to the "
                         "trained weights): " + ", ".join(self.skipped_random_init))
        return "\n".join(lines)


def _id_as_model(scores: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Rename the id column to ``model`` (an existing ``model`` becomes ``model_scores``)."""
    if id_column == "model":
        return scores
    return scores.rename(columns={"model": "model_scores"}).rename(columns={id_column: "model"})


def join_scores(results: pd.DataFrame, scores: pd.DataFrame,
                id_column: str = "model") -> tuple[pd.DataFrame, JoinReport]:
    """Inner join of per-model results with scores on exact id (results.model == id).

    Random-init rows are dropped. On overlapping columns the scan's value wins for the
    measured columns (``MEASURED``) and the score table's value for the rest (its
    hyper-parameters are the published nominal ones, e.g. 7 B rather than 6.74 B); the
    other side fills gaps. Zero matches -> ValueError listing both id sets.
    """
    trained = results[~results["random_init"]]
    keys, ours = scores[id_column].tolist(), trained["model"].tolist()
    report = JoinReport(matched=[m for m in ours if m in set(keys)],
                        unmatched_results=[m for m in ours if m not in set(keys)],
                        unmatched_scores=[k for k in keys if k not in set(ours)],
                        skipped_random_init=sorted(results.loc[results["random_init"], "model"]))
    if not report.matched:
        raise ValueError(
            "no result model id matches a score id (exact match on "
            f"{id_column!r}); result ids: {sorted(set(ours))[:10]}; "
            f"score ids (first 10): {keys[:10]}; fix the ids or pick --id-column")
    right = _id_as_model(scores, id_column)
    joined = trained.merge(right, on="model", how="inner", suffixes=("", "__scores"))
    for col in [c[: -len("__scores")] for c in joined.columns if c.endswith("__scores")]:
        ours, theirs = joined[col], joined[col + "__scores"]
        joined[col] = ours.combine_first(theirs) if col in MEASURED else theirs.combine_first(ours)
        joined = joined.drop(columns=col + "__scores")
    return joined.reset_index(drop=True), report


def apply_subset(table: pd.DataFrame, expr: str | None = None,
                 base_only: bool = False) -> pd.DataFrame:
    """Rows matching a ``DataFrame.query`` expression and/or ``fine_tuned == False``."""
    out = table
    if base_only:
        if "fine_tuned" not in out.columns:
            raise ValueError("--base-only needs a 'fine_tuned' column (e.g. from the paper "
                             f"table); columns available: {', '.join(map(str, out.columns))}")
        out = out[~_as_bool(out["fine_tuned"])]
    if expr:
        try:
            out = out.query(expr)
        except Exception as exc:  # query raises many types (SyntaxError, UndefinedVariable…)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"bad --subset {expr!r}: {msg}; columns available: "
                             f"{', '.join(map(str, table.columns))}") from None
        if not isinstance(out, pd.DataFrame) or len(out) == 0:
            raise ValueError(f"--subset {expr!r} selects no rows (of {len(table)})")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- figures

def _figure(width: float = 6.4, height: float = 4.8):
    # Figure() without pyplot renders through Agg and touches no global backend state.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


# Label offsets tried in turn (points; ha): right-up, right-down, left-up, left-down, farther.
_LABEL_SPOTS = [((3, 2), "left"), ((3, -8), "left"), ((-3, 2), "right"), ((-3, -8), "right"),
                ((5, -3), "left"), ((-5, -3), "right"), ((3, 8), "left"), ((3, -14), "left"),
                ((-3, 8), "right"), ((-3, -14), "right")]


def _overlap(a, b) -> float:
    """Overlap area of two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _label_points(ax, x, y, names, fontsize: float = 6.0, settle: bool = True) -> None:
    """Label each point with its model name, greedily avoiding other labels and the frame.

    Call after everything else is drawn on ``ax`` (the axis limits must be final). Text
    extents are estimated (0.6 em per character) to avoid a renderer round trip.
    """
    fig = ax.figure
    if settle:  # settle the layout and the autoscaled limits (skip if the caller did)
        fig.draw_without_rendering()
    px = fig.dpi / 72.0
    frame = ax.get_window_extent()
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    placed: list[tuple] = []
    if ax.get_legend() is not None:
        box = ax.get_legend().get_window_extent()
        placed.append((box.x0, box.y0, box.x1, box.y1))
    points = ax.transData.transform(np.column_stack([np.asarray(x, float), np.asarray(y, float)]))
    r = 3.0 * px  # markers are obstacles too, weighted less than other labels
    markers = [(X - r, Y - r, X + r, Y + r) for X, Y in points]
    for (X, Y), name in sorted(zip(map(tuple, points), map(str, names))):
        w, h = 0.6 * fontsize * len(name) * px, 1.1 * fontsize * px
        best = None
        for (dx, dy), ha in _LABEL_SPOTS:
            x0 = X + dx * px - (w if ha == "right" else 0.0)
            box = (x0, Y + dy * px, x0 + w, Y + dy * px + h)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] \
                and box[3] <= frame[3]
            cost = (sum(_overlap(box, other) for other in placed)
                    + 0.5 * sum(_overlap(box, m) for m in markers) + (0.0 if inside else 1e9))
            if best is None or cost < best[0]:
                best = (cost, box, (dx, dy), ha)
            if cost == 0.0:
                break
        _, box, offset, ha = best
        placed.append(box)
        xy = ax.transData.inverted().transform((X, Y))
        ax.annotate(name, xy, xytext=offset, textcoords="offset points", fontsize=fontsize,
                    ha=ha, va="bottom", alpha=0.85, annotation_clip=False).set_in_layout(False)


def _fit_text(fit: LinearFit) -> str:
    return f"linear: R² = {fit.r2:.2f}, p = {fit.p:.2g} (n = {fit.n})"


def _numeric_pair(table: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows of (model, x, y) with both values numeric and present."""
    cols = list(dict.fromkeys([x, y]))  # x == y is allowed (a degenerate diagonal)
    data = table[["model", *cols]].copy()
    data[cols] = data[cols].apply(pd.to_numeric, errors="coerce")
    return data.dropna()


def _draw_linear(ax, data: pd.DataFrame, x: str, y: str, alpha: float,
                 legend: bool) -> LinearFit | None:
    """Linear fit line and its mean-response band on ``ax``; None if it cannot be fitted."""
    try:
        fit = linear_fit(data[x], data[y], alpha=alpha)
    except ValueError:
        return None
    grid = np.linspace(data[x].min(), data[x].max(), 200)
    lo, hi = fit.band(grid)
    ax.plot(grid, fit.predict(grid), color="C1", label=_fit_text(fit) if legend else None)
    ax.fill_between(grid, lo, hi, color="C1", alpha=0.2,
                    label=f"{100 * (1 - alpha):.0f}% CI of the mean" if legend else None)
    return fit


def plot_scatter(table: pd.DataFrame, x: str, y: str, path: Path, alpha: float = 0.05,
                 with_exp: bool = False, title: str = "", labels: dict | None = None) -> dict:
    """Scatter y vs x with points labelled by model, linear fit, its (1-alpha) mean-response
    band, and optionally the exponential fit (Fig. 1a / 8 / 9). Returns
    {"linear": LinearFit | None, "exponential": ExpFit | None}."""
    labels = {**LABELS, **(labels or {})}
    data = _numeric_pair(table, x, y)
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(data[x], data[y], s=18, zorder=3)
    fits = {"linear": _draw_linear(ax, data, x, y, alpha, legend=True), "exponential": None}
    if fits["linear"] is None:
        title += f"\n(no linear fit: {len(data)} points or a constant column)"
    if with_exp and len(data) >= 4 and data[x].nunique() > 1:
        efit = fits["exponential"] = exponential_fit(data[x], data[y])
        grid = np.linspace(data[x].min(), data[x].max(), 200)
        if efit.converged:
            ax.plot(grid, efit.predict(grid), "--", color="C2",
                    label=f"a·exp(b·x)+c: R² = {efit.r2:.2f}")
        else:
            ax.plot([], [], " ", label="exponential fit did not converge")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(labels.get(x, x))
    ax.set_ylabel(labels.get(y, y))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    _label_points(ax, data[x], data[y], data["model"])
    fig.savefig(path, dpi=150)
    return fits


def plot_r2_bars(corr: pd.DataFrame, score_column: str, path: Path,
                 labels: dict | None = None) -> None:
    """Bar chart of R² per hyper-parameter vs the score ("correlation_hyperparams")."""
    labels = {**LABELS, **(labels or {})}
    ok = corr[np.isfinite(corr["r2"])]
    fig = _figure(5.6, 3.8)
    ax = fig.add_subplot()
    colors = ["C3" if name == "coupling" else "C0" for name in ok.index]
    bars = ax.bar([labels.get(n, n).split(" (")[0] for n in ok.index], ok["r2"], color=colors)
    for bar, (_, row) in zip(bars, ok.iterrows()):
        ax.annotate(f"R²={row.r2:.2f}\np={row.p:.2g}\nn={int(row.n)}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    # Head room above the tallest bar for its three-line annotation; ticks stay in [0, 1].
    ax.set_ylim(0, (max(ok["r2"].max(), 0.05) * 1.2 + 0.12) if len(ok) else 1.0)
    ax.set_yticks([t for t in np.linspace(0, 1, 6) if t <= ax.get_ylim()[1]])
    ax.set_ylabel(f"R² with {labels.get(score_column, score_column)}", fontsize=9)
    ax.set_title("correlation of hyper-parameters with the score", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=150)


def plot_hyperparam_grid(table: pd.DataFrame, corr: pd.DataFrame, score_column: str,
                         path: Path, alpha: float = 0.05, labels: dict | None = None) -> None:
    """One panel per fitted hyper-parameter: score vs it with linear fit and band (Fig. 9)."""
    labels = {**LABELS, **(labels or {})}
    names = [n for n in corr.index if np.isfinite(corr.loc[n, "r2"])]
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig = _figure(4.2 * cols, 3.4 * rows)
    panels = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        data = _numeric_pair(table, name, score_column)
        ax.scatter(data[name], data[score_column], s=12, zorder=3)
        fit = _draw_linear(ax, data, name, score_column, alpha, legend=False)
        ax.set_title(f"R² = {fit.r2:.2f}, p = {fit.p:.2g}, n = {fit.n}", fontsize=9)
        ax.set_xlabel(labels.get(name, name), fontsize=9)
        ax.set_ylabel(labels.get(score_column, score_column), fontsize=8)
        ax.grid(alpha=0.3)
        panels.append((ax, data, name))
    fig.draw_without_rendering()  # labels last: they need every panel's final limits
    for ax, data, name in panels:
        _label_points(ax, data[name], data[score_column], data["model"], fontsize=5.5,
                      settle=False)
    fig.savefig(path, dpi=130)


# --------------------------------------------------------------------------- driver

def format_correlations(corr: pd.DataFrame, score_column: str) -> str:
    """Small text table of n, r, R², p per hyper-parameter."""
    lines = [f"hyper-parameter vs {score_column}",
             f"{'column':<16}{'n':>4}{'r':>9}{'R²':>8}{'p':>11}  note"]
    for name, row in corr.iterrows():
        lines.append(f"{name:<16}{int(row.n):>4}{row.r:>9.3f}{row.r2:>8.3f}{row.p:>11.3g}  "
                     f"{row.note}")
    return "\n".join(lines)


def build_table(results: Sequence[str | Path] | None, scores: str | Path | pd.DataFrame,
                id_column: str = "model", coupling_metric: str = "raw",
                subset: str | None = None, base_only: bool = False,
                echo: Callable[[str], None] = print) -> tuple[pd.DataFrame, JoinReport | None]:
    """Per-model analysis table: results joined with scores (or the score table alone when
    ``results`` is empty), ``coupling`` chosen, subset applied, one row per model id."""
    score_table = (scores.copy() if isinstance(scores, pd.DataFrame)
                   else load_scores(scores, id_column))
    report = None
    if results:
        table, report = join_scores(load_results(results), score_table, id_column)
        echo(report.describe())
    else:
        table = normalize_model_table(_id_as_model(score_table, id_column), "score table")
    table = apply_subset(select_coupling(table, coupling_metric), subset, base_only)
    dup = table["model"][table["model"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"model ids repeated after the join: {dup[:5]} (several revisions?); "
                         "keep one per model, e.g. --subset \"revision == 'main'\"")
    if subset or base_only:
        echo(f"{len(table)} model(s) after --subset/--base-only")
    return table, report


def run_correlate(results: Sequence[str | Path] | None, scores: str | Path | pd.DataFrame | None,
                  by: str = "score", subset: str | None = None,
                  out_dir: str | Path = "correlate_out",
                  score_columns: Sequence[str] = ("openllm_score",), id_column: str = "model",
                  base_only: bool = False, coupling_metric: str = "raw", alpha: float = 0.05,
                  echo: Callable[[str], None] = print) -> dict:
    """Join results with scores, fit, write ``correlation.csv``, ``joined.csv`` and figures.

    With no ``results`` the score table itself is analysed (hyper-parameters vs score, e.g.
    the paper's Table 1). ``by`` picks the main scatter: ``score`` plots score against
    coupling (Fig. 1a/8, with the exponential fit); any other choice plots coupling against
    that hyper-parameter (Fig. 9 left), or the score when there is no coupling (Fig. 9 right).
    Per score column: ``correlation_hyperparams.png`` (R² bars), ``hyperparams_vs_score.png``
    (one panel per hyper-parameter) and ``<y>_vs_<x>.png`` (suffixed ``_<score>`` when
    several score columns are given). Returns {"joined", "correlations", "fits", "files",
    "report"}.
    """
    if by not in BY_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(BY_COLUMNS)}, got {by!r}")
    if scores is None:
        raise ValueError("no score table: pass --scores FILE.csv or --paper-table")
    joined, report = build_table(results, scores, id_column, coupling_metric, subset,
                                 base_only, echo)
    missing = [c for c in score_columns if c not in joined.columns]
    if missing:
        raise ValueError(f"score column(s) {missing} not found (use --score-column); "
                         f"columns available: {', '.join(map(str, joined.columns))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"joined": out / "joined.csv", "correlation": out / "correlation.csv"}
    joined.to_csv(files["joined"], index=False)
    labels = {"coupling": f"coupling (− mean {coupling_metric} mis-coupling)"}
    corr_frames, fits = [], {}
    for score in score_columns:
        corr = hyperparameter_correlations(joined, score, alpha=alpha)
        corr_frames.append(corr.reset_index().assign(score=score))
        echo(format_correlations(corr, score))
        sfx = f"_{score}" if len(score_columns) > 1 else ""
        files[f"hyperparams{sfx}"] = out / f"correlation_hyperparams{sfx}.png"
        plot_r2_bars(corr, score, files[f"hyperparams{sfx}"], labels)
        files[f"grid{sfx}"] = out / f"hyperparams_vs_score{sfx}.png"
        plot_hyperparam_grid(joined, corr, score, files[f"grid{sfx}"], alpha, labels)
        xy = scatter_axes(joined, by, score)
        if isinstance(xy, str):
            echo(xy)
            fits[score] = None
        else:
            files[f"scatter{sfx}"] = out / f"{xy[1]}_vs_{xy[0]}{sfx}.png"
            fits[score] = _main_scatter(joined, xy, files[f"scatter{sfx}"], alpha, labels, echo)
    correlations = pd.concat(corr_frames, ignore_index=True)[
        ["score", "hyperparam", "n", "n_dropped", "r", "r2", "p", "slope", "intercept", "note"]]
    correlations.to_csv(files["correlation"], index=False)
    echo(f"wrote {', '.join(str(p) for p in files.values())}")
    return {"joined": joined, "correlations": correlations, "fits": fits, "files": files,
            "report": report}


def scatter_axes(joined: pd.DataFrame, by: str, score: str) -> tuple[str, str] | str:
    """(x, y) columns of the ``--by`` scatter, or a reason string when it cannot be drawn."""
    has_coupling = "coupling" in joined.columns and joined["coupling"].notna().any()
    column = BY_COLUMNS[by]
    if by == "score":
        return ("coupling", score) if has_coupling else (
            "no coupling values: skipping the coupling-vs-score scatter "
            "(see correlation_hyperparams.png for the hyper-parameters)")
    if column not in joined.columns:
        return f"no {column!r} column: skipping the --by {by} scatter"
    return column, ("coupling" if has_coupling else score)


def _main_scatter(joined: pd.DataFrame, xy: tuple[str, str], path: Path, alpha: float,
                  labels: dict, echo: Callable[[str], None]) -> dict:
    """Draw the main scatter; exponential fit only for score vs coupling (Fig. 8)."""
    x, y = xy
    names = {**LABELS, **labels}
    fits = plot_scatter(joined, x, y, path, alpha=alpha, with_exp=(x == "coupling"),
                        labels=labels, title=f"{names.get(y, y)} vs {names.get(x, x)}")
    if fits["linear"] is not None:
        echo(f"{y} vs {x}: {_fit_text(fits['linear'])}")
    efit = fits["exponential"]
    if efit is not None:
        echo(f"{y} = a·exp(b·{x}) + c: a = {efit.a:.4g}, b = {efit.b:.4g}, c = {efit.c:.4g}, "
             f"R² = {efit.r2:.3f}" if efit.converged else f"{efit.message}; showing linear only")
    return fits


# --------------------------------------------------------------------------- CLI



def cmd_correlate(args: argparse.Namespace) -> int:
    """Run ``correlate`` from parsed args; ValueError -> one-line message, exit code 2."""
    scores = args.scores
    if args.paper_table:
        if scores:
            print("coupling correlate: error: give --scores or --paper-table, not both",
                  file=sys.stderr)
            return 2
        scores = PAPER_TABLE
    try:
        run_correlate(args.results, scores, by=args.by, subset=args.subset, out_dir=args.out,
                      score_columns=args.score_columns or ["openllm_score"],
                      id_column=args.id_column, base_only=args.base_only,
                      coupling_metric=args.coupling_metric, alpha=args.alpha)
    except ValueError as exc:
        print(f"coupling correlate: error: {exc}", file=sys.stderr)
        return 2
    return 0
