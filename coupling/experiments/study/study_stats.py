"""The controlled study's statistics: the numbers behind docs/study.md's tables.

Pure functions of the runner's tidy tables (see :mod:`coupling.experiments.study.analyses` for their
columns), each returning a DataFrame or a dict, so they can be tested on synthetic tables
with known answers: the final checkpoint per model (:func:`final_main`), coupling and the
other predictors vs held-out performance with bootstrap intervals (:func:`predictors`),
partial correlation at fixed parameter count (:func:`partial_correlation`,
:func:`partial_table`), coupling vs training step (:func:`step_table`), the ViT grid
(:func:`vit_tables`), pruning (:func:`pruning_summary`, :func:`single_block_summary`) and
the markdown rendering of a table (:func:`markdown_table`).  The figures are in
:mod:`coupling.experiments.study.study_figures`; :func:`coupling.experiments.study.analyses.write_analyses` writes
both.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from coupling.errors import first_line
from coupling.experiments.fits import linear_fit

TARGETS = ("eval_loss", "eval_acc", "mc_acc")
PREDICTORS = ("coupling", "params", "n_layer", "n_embd", "total_steps")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
def _require(df: pd.DataFrame, columns, table: str):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{table} table lacks column(s) {missing}: pass the runner's tidy "
                         f"table (columns: {', '.join(map(str, df.columns))})")


def _as_bool(s: pd.Series) -> pd.Series:
    """Booleans that survived a CSV round trip ("True", 1, True)."""
    return s.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes"))


def _numeric(df: pd.DataFrame, columns) -> pd.DataFrame:
    return df[list(columns)].apply(pd.to_numeric, errors="coerce").dropna()


def _spearman(x, y) -> tuple[float, float]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def final_main(lm: pd.DataFrame, scan: str = "main") -> pd.DataFrame:
    """Each model's final checkpoint under one scan variant, with ``log10_params`` added;
    rows without a coupling value (unscanned) are dropped."""
    _require(lm, ["model", "final", "scan", "coupling", "params"], "lm")
    out = lm[_as_bool(lm["final"]) & (lm["scan"] == scan)].copy()
    out = out[pd.to_numeric(out["coupling"], errors="coerce").notna()]
    out["log10_params"] = np.log10(pd.to_numeric(out["params"], errors="coerce"))
    return out.drop_duplicates("model", keep="last").reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# 1. Coupling and the other predictors vs performance
# ------------------------------------------------------------------------------------------
def _bootstrap_r(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple:
    """Percentile 95% intervals of r and of R^2 over ``n_boot`` resamples of the rows
    (models) with replacement; resamples where x or y is constant are left out."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    X, Y = x[idx], y[idx]
    dx, dy = X - X.mean(1, keepdims=True), Y - Y.mean(1, keepdims=True)
    den = np.sqrt((dx * dx).sum(1) * (dy * dy).sum(1))
    with np.errstate(all="ignore"):
        r = np.where(den > 0, (dx * dy).sum(1) / den, np.nan)
    r = np.clip(r[np.isfinite(r)], -1, 1)
    if r.size < n_boot / 2:
        return (np.nan,) * 4 + (r.size,)
    lo, hi = np.percentile(r, [2.5, 97.5])
    lo2, hi2 = np.percentile(r * r, [2.5, 97.5])
    return lo, hi, lo2, hi2, r.size


def predictors(final_main: pd.DataFrame, target: str, predictors=PREDICTORS,
               n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per predictor: ``n, r, r2, p, slope`` of the least-squares line
    ``target ~ predictor`` (:func:`coupling.experiments.fits.linear_fit`) and bootstrap 95% intervals
    ``r_lo, r_hi, r2_lo, r2_hi`` (models resampled with replacement, seeded); ``note`` says
    why a row is empty (absent or constant predictor, fewer than 3 models)."""
    _require(final_main, [target], "final_main")
    if "model" in final_main and final_main["model"].duplicated().any():
        raise ValueError("final_main holds several rows per model: pass one row per model "
                         "(analyses.final_main(lm) selects the final checkpoint, main scan)")
    rows = []
    for name in predictors:
        row = {"predictor": name, "n": 0, "r": np.nan, "r2": np.nan, "p": np.nan,
               "slope": np.nan, "r_lo": np.nan, "r_hi": np.nan, "r2_lo": np.nan,
               "r2_hi": np.nan, "note": ""}
        rows.append(row)
        if name not in final_main.columns:
            row["note"] = "not in table"
            continue
        pair = _numeric(final_main, [name, target])
        row["n"] = len(pair)
        try:
            fit = linear_fit(pair[name], pair[target])
        except ValueError as exc:
            row["note"] = first_line(exc).split(":")[0]
            continue
        x, y = pair[name].to_numpy(), pair[target].to_numpy()
        lo, hi, lo2, hi2, n_ok = _bootstrap_r(x, y, n_boot, seed)
        row.update(r=fit.r, r2=fit.r2, p=fit.p, slope=fit.slope, r_lo=lo, r_hi=hi,
                   r2_lo=lo2, r2_hi=hi2)
        if n_ok < n_boot:
            row["note"] = f"{n_boot - n_ok} of {n_boot} resamples constant, left out"
    return pd.DataFrame(rows)


def partial_correlation(df: pd.DataFrame, x: str, y: str, controls) -> dict:
    """Correlation of ``x`` and ``y`` after both are residualised on ``controls`` (least
    squares with an intercept), e.g. ``controls=["log10_params"]`` for "at fixed parameter
    count".  ``p`` from t = r sqrt(dof / (1 - r^2)) with dof = n - 2 - k, k the rank of the
    controls.  Returns ``{r, p, n, k, dof, note}``; r and p are NaN (``note`` says why) when
    too few rows remain or a residual vanishes."""
    controls = list(controls)
    _require(df, [x, y, *controls], "the")
    data = _numeric(df, dict.fromkeys([x, y, *controls]))
    n = len(data)
    Z = np.column_stack([np.ones(n)] + [data[c].to_numpy() for c in controls])
    k = int(np.linalg.matrix_rank(Z)) - 1 if n else len(controls)
    out = {"r": np.nan, "p": np.nan, "n": n, "k": k, "dof": n - 2 - k, "note": ""}
    if out["dof"] < 1:
        out["note"] = f"too few rows ({n}) for {k} control(s)"
        return out
    res = []
    for col in (x, y):
        v = data[col].to_numpy(float)
        coef, *_ = np.linalg.lstsq(Z, v, rcond=None)
        e = v - Z @ coef
        if np.linalg.norm(e) <= 1e-10 * max(np.linalg.norm(v - v.mean()), 1e-300):
            out["note"] = f"{col} is fixed by the controls (no residual variation)"
            return out
        res.append(e)
    r = float(np.clip(np.corrcoef(*res)[0, 1], -1, 1))
    t = np.inf if abs(r) == 1 else r * math.sqrt(out["dof"] / (1 - r * r))
    out.update(r=r, p=float(2 * stats.t.sf(abs(t), out["dof"])))
    return out


def partial_table(final_main: pd.DataFrame, targets=TARGETS,
                  control_sets=(("log10_params",), ("log10_params", "total_steps"))):
    """Partial correlation of coupling with each target for each set of controls."""
    rows = []
    for target in targets:
        for controls in control_sets:
            if target in final_main and all(c in final_main for c in controls):
                rows.append({"target": target, "controls": " + ".join(controls),
                             **partial_correlation(final_main, "coupling", target, controls)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# 2. Coupling vs training step
# ------------------------------------------------------------------------------------------
def step_table(lm: pd.DataFrame) -> pd.DataFrame:
    """Per model and scan variant: the step of peak coupling, coupling at the first step, the
    peak and the end, peak - end, Spearman rho (and p) of coupling vs step, and whether the
    curve never decreases (``monotone_rise``).  ``k_over_d`` = K / d shows the K/d regime."""
    _require(lm, ["model", "factor", "step", "scan", "coupling", "n_embd", "n_layer"], "lm")
    rows = []
    for (model, scan), part in lm.groupby(["model", "scan"], sort=False):
        part = part[pd.to_numeric(part["coupling"], errors="coerce").notna()].sort_values("step")
        if part.empty:
            continue
        c, s = part["coupling"].to_numpy(float), part["step"].to_numpy()
        peak = int(np.argmax(c))
        rho, p = _spearman(s, c)
        first = part.iloc[0]
        k = first.get("k", np.nan)
        rows.append({"model": model, "scan": scan, "factor": first["factor"],
                     "n_layer": first["n_layer"], "n_embd": first["n_embd"], "k": k,
                     "k_over_d": float(k) / float(first["n_embd"]) if pd.notna(k) else np.nan,
                     "last_block": first.get("last_block", ""), "checkpoints": len(part),
                     "coupling_first": c[0], "peak_step": int(s[peak]), "coupling_peak": c[peak],
                     "end_step": int(s[-1]), "coupling_end": c[-1],
                     "peak_minus_end": c[peak] - c[-1],
                     "spearman_rho": rho, "spearman_p": p,
                     "monotone_rise": bool(np.all(np.diff(c) >= 0))})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# 4. Vision transformers: stochastic depth x weight decay
# ------------------------------------------------------------------------------------------
def vit_tables(vit: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``vit_grid``: per (stochastic depth, weight decay) the number of seeds and the mean,
    std, min, max of coupling and mean test accuracy; ``vit_spearman``: Spearman rho of
    (stochastic depth, coupling) per weight decay and pooled, over individual models;
    ``vit_acc``: coupling vs test accuracy (r, p, slope) at each fixed stochastic depth."""
    _require(vit, ["stochastic_depth", "weight_decay", "coupling", "test_acc"], "vit")
    v = vit.dropna(subset=["coupling"])
    grid = (v.groupby(["stochastic_depth", "weight_decay"])
            .agg(n=("coupling", "size"), coupling_mean=("coupling", "mean"),
                 coupling_std=("coupling", "std"), coupling_min=("coupling", "min"),
                 coupling_max=("coupling", "max"), test_acc_mean=("test_acc", "mean"),
                 test_acc_std=("test_acc", "std")).reset_index())
    sp = []
    groups = [(str(wd), part) for wd, part in v.groupby("weight_decay")] + [("pooled", v)]
    for wd, part in groups:
        rho, p = _spearman(part["stochastic_depth"], part["coupling"])
        sp.append({"weight_decay": wd, "n": len(part), "spearman_rho": rho, "p": p})
    acc = []
    for sd, part in v.groupby("stochastic_depth"):
        row = {"stochastic_depth": sd, "n": len(part), "r": np.nan, "p": np.nan,
               "slope": np.nan, "note": ""}
        try:
            fit = linear_fit(part["test_acc"], part["coupling"])
            row.update(r=fit.r, p=fit.p, slope=fit.slope)
        except ValueError as exc:
            row["note"] = first_line(exc).split(":")[0]
        acc.append(row)
    return {"vit_grid": grid, "vit_spearman": pd.DataFrame(sp), "vit_acc": pd.DataFrame(acc)}


# ------------------------------------------------------------------------------------------
# 5. Pruning
# ------------------------------------------------------------------------------------------
def pruning_summary(pruning: pd.DataFrame, n_removed=(1, 2, 3)) -> pd.DataFrame:
    """Per model and order: loss increase after each of ``n_removed`` blocks (mean over
    repetitions; random's min and max too), their mean, and the order's rank within the
    model by that mean (1 = the smallest loss, ``best``)."""
    _require(pruning, ["model", "order", "rep", "n_removed", "loss_increase"], "pruning")
    rows = []
    for (model, order), part in pruning.groupby(["model", "order"], sort=False):
        row = {"model": model, "order": order, "reps": part["rep"].nunique()}
        for n in n_removed:
            vals = part.loc[part["n_removed"] == n, "loss_increase"]
            row[f"increase_{n}"] = vals.mean() if len(vals) else np.nan
            if row["reps"] > 1:
                row[f"min_{n}"], row[f"max_{n}"] = (vals.min(), vals.max()) if len(vals) \
                    else (np.nan, np.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["mean_increase"] = np.nanmean(out[[f"increase_{n}" for n in n_removed]], axis=1)
    out["rank"] = out.groupby("model")["mean_increase"].rank(method="min").astype("Int64")
    out["best"] = out["rank"] == 1
    return out


def single_block_summary(single: pd.DataFrame) -> pd.DataFrame:
    """Per model: Spearman rho (and p) of a block's single-removal loss increase with its
    neighbour coupling and with its angular distance, and the cheapest/costliest block."""
    _require(single, ["model", "block", "loss_increase", "neighbour_coupling",
                      "angular_distance"], "pruning_single")
    rows = []
    for model, part in single.groupby("model", sort=False):
        row = {"model": model, "blocks": len(part)}
        for col in ("neighbour_coupling", "angular_distance"):
            ok = part[[col, "loss_increase"]].dropna()
            row[f"rho_{col}"], row[f"p_{col}"] = _spearman(ok[col], ok["loss_increase"])
        row["cheapest_block"] = int(part.loc[part["loss_increase"].idxmin(), "block"])
        row["costliest_block"] = int(part.loc[part["loss_increase"].idxmax(), "block"])
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
def _cell(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), fmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt=".3g") -> str:
    """A GitHub markdown table of ``df`` (index dropped); ``floatfmt`` is one format or a
    ``{column: format}`` dict (others ``.3g``); NaN prints empty, booleans as yes/no."""
    fmts = floatfmt if isinstance(floatfmt, dict) else {}
    default = ".3g" if isinstance(floatfmt, dict) else floatfmt
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, fmts.get(c, default))
                                         for c, v in zip(cols, row)) + " |")
    return "\n".join(lines)
