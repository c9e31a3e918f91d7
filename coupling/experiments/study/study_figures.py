"""The controlled study's figures: one matplotlib ``Figure`` per analysis of docs/study.md.

Each ``fig_*`` draws one analysis from the runner's tidy tables (columns in
:mod:`coupling.experiments.study.analyses`) and returns the figure unsaved: performance vs coupling and
the other predictors (:func:`fig_performance`), coupling and regularity vs training step
(:func:`fig_coupling_vs_step`, :func:`fig_regularity_vs_step`), the ViT grid
(:func:`fig_vit`) and pruning (:func:`fig_pruning`, :func:`fig_single_block`).  The numbers
they show come from the same fits as the tables in :mod:`coupling.experiments.study.study_stats`;
:func:`coupling.experiments.study.analyses.write_analyses` saves both.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from coupling.errors import first_line
from coupling.experiments.fits import linear_fit
from coupling.experiments.study.study_stats import PREDICTORS, _numeric, _require, _spearman
from coupling.figures.common import _empty_note
from coupling.figures.training import _step_axis

# The hyper-parameter each factor varies (``base`` varies only the seed).
FACTOR_COLUMN = {"base": "seed", "width": "n_embd", "depth": "n_layer", "steps": "total_steps",
                 "weight_decay": "weight_decay", "dropout": "dropout"}
FACTOR_COLORS = {"base": "black", "width": "tab:blue", "depth": "tab:orange",
                 "steps": "tab:green", "weight_decay": "tab:red", "dropout": "tab:purple"}
ORDER_COLORS = {"coupling-most": "tab:red", "coupling-least": "tab:blue",
                "angular": "tab:green", "random": "0.4"}
COUPLING = r"coupling $1-\tilde{m}$"


def _p(p: float) -> str:
    """``p=0.012`` for a legend; a p that underflowed to 0 is shown as a bound."""
    return f"p={p:.2g}" if p >= 1e-300 else "p<1e-300"


# ------------------------------------------------------------------------------------------
# 1. Coupling and the other predictors vs performance
# ------------------------------------------------------------------------------------------
def _scatter_fit(ax, df: pd.DataFrame, x: str, y: str):
    """Points coloured by factor, the least-squares line with R^2, p, n in the legend (linear
    axes: the fit is linear in the column as given)."""
    for factor, part in df.groupby("factor", sort=False):
        ax.scatter(part[x], part[y], s=22, color=FACTOR_COLORS.get(factor, "0.5"),
                   label=None, zorder=3)
    pair = _numeric(df, [x, y])
    try:
        fit = linear_fit(pair[x], pair[y])
    except ValueError as exc:
        ax.plot([], [], " ", label=first_line(exc).split(":")[0])
    else:
        grid = np.linspace(pair[x].min(), pair[x].max(), 100)
        ax.plot(grid, fit.predict(grid), color="0.3", lw=1,
                label=f"$R^2$={fit.r2:.2f}, r={fit.r:+.2f}, {_p(fit.p)}, n={fit.n}")
    ax.set_xlabel(COUPLING if x == "coupling" else x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7, loc="best")


def fig_performance(final_main: pd.DataFrame, target: str, predictors=PREDICTORS) -> Figure:
    """``target`` against coupling and each other predictor, one panel each, points coloured
    by the factor the model varies (the paper's Table 3 as scatter plots)."""
    _require(final_main, ["factor", target, *predictors], "final_main")
    fig = Figure(figsize=(13.5, 7.6), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, name in zip(axes, predictors):
        _scatter_fit(ax, final_main, name, target)
    legend_ax = axes[len(predictors)] if len(predictors) < len(axes) else None
    for ax in axes[len(predictors):]:
        ax.axis("off")
    if legend_ax is not None:
        factors = list(dict.fromkeys(final_main["factor"]))
        handles = [legend_ax.scatter([], [], color=FACTOR_COLORS.get(f, "0.5"), label=f)
                   for f in factors]
        legend_ax.legend(handles=handles, title="factor varied", loc="center")
    fig.suptitle(f"{target} of each model's final checkpoint vs coupling and size "
                 f"({len(final_main)} models)")
    return fig


# ------------------------------------------------------------------------------------------
# 2-3. Measures vs training step
# ------------------------------------------------------------------------------------------
def _grid(n_panels: int, ncols: int = 4, size=(4.2, 3.3)):
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.axis("off")
    return fig, axes


def _factors(df: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(df["factor"]))
    return [f for f in FACTOR_COLUMN if f in present] + [f for f in present
                                                         if f not in FACTOR_COLUMN]


def _factor_panel(ax, df: pd.DataFrame, factor: str, column: str, ylabel: str):
    """``column`` vs step for the models of one factor (coloured by the varied value), the
    base models drawn thin and grey for reference."""
    if factor != "base":
        for _, part in df[df["factor"] == "base"].groupby("model"):
            part = part.sort_values("step")
            ax.plot(part["step"], part[column], color="0.75", lw=0.9, zorder=1)
    mine = df[df["factor"] == factor]
    varied = FACTOR_COLUMN.get(factor, "model")
    varied = varied if varied in mine.columns else "model"
    models = mine.drop_duplicates("model").sort_values(varied)["model"].tolist()
    cmap = colormaps["viridis"]
    for i, name in enumerate(models):
        part = mine[mine["model"] == name].sort_values("step")
        ok = part[column].notna()
        value = part[varied].iloc[0]
        ax.plot(part["step"][ok], part[column][ok], marker="o", ms=3, lw=1.4,
                color=cmap(0.85 * i / max(1, len(models) - 1)), label=f"{varied}={value:g}"
                if isinstance(value, (int, float, np.number)) else str(value))
    steps = df["step"].dropna().tolist()
    if steps:
        _step_axis(ax, steps)
    if not mine[column].notna().any():
        _empty_note(ax, f"no {column} values (e.g. too few hidden states)")
    ax.set_title(f"{factor}" + ("" if factor == "base" else " (grey: base)"), fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def fig_coupling_vs_step(lm: pd.DataFrame) -> Figure:
    """Coupling vs training step per model, one panel per factor (main scan), plus a panel
    comparing the scan variants (K, last-block convention) on the base models."""
    _require(lm, ["model", "factor", "step", "scan", "coupling"], "lm")
    main = lm[lm["scan"] == "main"]
    factors = _factors(main)
    fig, axes = _grid(len(factors) + 1)
    for ax, factor in zip(axes, factors):
        _factor_panel(ax, main, factor, "coupling", COUPLING)
    ax = axes[len(factors)]
    base = lm[lm["factor"] == "base"] if (lm["factor"] == "base").any() else lm
    cmap, styles = colormaps["tab10"], ("-", "--", ":", "-.")
    for i, (scan, part) in enumerate(base.groupby("scan", sort=False)):
        desc = ", ".join(f"{c}={part[c].iloc[0]}" for c in ("k", "last_block") if c in part)
        for j, (_, run) in enumerate(part.groupby("model")):
            run = run.sort_values("step")
            ax.plot(run["step"], run["coupling"], color=cmap(i), ls=styles[i % 4], lw=1.2,
                    marker=".", label=f"{scan} ({desc})" if j == 0 else None)
    _step_axis(ax, base["step"].tolist())
    ax.set_title("scan variants, base models", fontsize=10)
    ax.set_ylabel(COUPLING)
    ax.legend(fontsize=7)
    fig.suptitle("Coupling vs training step (step 0 = initialisation, at the left)")
    return fig


def fig_regularity_vs_step(lm: pd.DataFrame, scan: str = "main") -> Figure:
    """LSS (Fig. 25) and expodistance (Fig. 24) vs step, one column per factor."""
    _require(lm, ["model", "factor", "step", "scan", "lss", "expodistance"], "lm")
    main = lm[lm["scan"] == scan]
    factors = _factors(main)
    fig = Figure(figsize=(4.0 * len(factors), 6.4), layout="constrained")
    axes = fig.subplots(2, len(factors), squeeze=False)
    for j, factor in enumerate(factors):
        _factor_panel(axes[0, j], main, factor, "lss", "LSS (lower = more regular)")
        _factor_panel(axes[1, j], main, factor, "expodistance", "expodistance")
    fig.suptitle(f"Regularity of the hidden-state trajectory vs training step ({scan} scan)")
    return fig


# ------------------------------------------------------------------------------------------
# 4. Vision transformers: stochastic depth x weight decay
# ------------------------------------------------------------------------------------------
def fig_vit(vit: pd.DataFrame) -> Figure:
    """Coupling and test accuracy vs stochastic depth (a line per weight decay: mean over
    seeds, band = min-max), and coupling vs test accuracy per stochastic depth."""
    _require(vit, ["stochastic_depth", "weight_decay", "coupling", "test_acc"], "vit")
    v = vit.dropna(subset=["coupling"])
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    cmap = colormaps["plasma"]
    wds = sorted(v["weight_decay"].unique())
    for i, wd in enumerate(wds):
        g = v[v["weight_decay"] == wd].groupby("stochastic_depth")
        color = cmap(0.8 * i / max(1, len(wds) - 1))
        for ax, col in zip(axes[:2], ("coupling", "test_acc")):
            m = g[col].agg(["mean", "min", "max"])
            ax.plot(m.index, m["mean"], marker="o", color=color, label=f"weight decay {wd:g}")
            ax.fill_between(m.index, m["min"], m["max"], color=color, alpha=0.15, lw=0)
    for ax, label in zip(axes[:2], (COUPLING, "test accuracy")):
        ax.set_xlabel("stochastic depth p")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    sds = sorted(v["stochastic_depth"].unique())
    ax = axes[2]
    for i, sd in enumerate(sds):
        part = v[v["stochastic_depth"] == sd]
        color = colormaps["viridis"](0.9 * i / max(1, len(sds) - 1))
        ax.scatter(part["test_acc"], part["coupling"], color=color, s=22, zorder=3)
        try:
            fit = linear_fit(part["test_acc"], part["coupling"])
            grid = np.linspace(part["test_acc"].min(), part["test_acc"].max(), 20)
            ax.plot(grid, fit.predict(grid), color=color, lw=1,
                    label=f"sd {sd:g}: r={fit.r:+.2f}, {_p(fit.p)}, n={fit.n}")
        except ValueError:
            ax.plot([], [], "o", color=color, label=f"sd {sd:g}: n={len(part)}, no fit")
    ax.set_xlabel("test accuracy")
    ax.set_ylabel(COUPLING)
    ax.legend(fontsize=7)
    fig.suptitle(f"ViTs on digits: stochastic depth x weight decay ({len(v)} models)")
    return fig


# ------------------------------------------------------------------------------------------
# 5. Pruning
# ------------------------------------------------------------------------------------------
def fig_pruning(pruning: pd.DataFrame) -> Figure:
    """Loss increase vs blocks removed, one panel per model: a line per order, random as the
    mean over its repetitions with a min-max band."""
    _require(pruning, ["model", "order", "rep", "n_removed", "loss_increase"], "pruning")
    models = list(dict.fromkeys(pruning["model"]))
    fig, axes = _grid(len(models), ncols=3, size=(4.6, 3.6))
    for ax, model in zip(axes, models):
        part = pruning[pruning["model"] == model]
        for order, o in part.groupby("order", sort=False):
            g = o.groupby("n_removed")["loss_increase"].agg(["mean", "min", "max", "size"])
            color = ORDER_COLORS.get(order, "tab:brown")
            label = order if g["size"].max() == 1 else f"{order} (mean of {g['size'].max()})"
            ax.plot(g.index, g["mean"], marker="o", color=color, label=label)
            if g["size"].max() > 1:
                ax.fill_between(g.index, g["min"], g["max"], color=color, alpha=0.2, lw=0)
        ax.set_title(model, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("blocks removed")
        ax.set_ylabel("held-out loss increase")
        ax.legend(fontsize=7)
    fig.suptitle("Block pruning: removal order vs held-out loss")
    return fig


def fig_single_block(single: pd.DataFrame) -> Figure:
    """Single-block loss increase vs neighbour coupling and vs angular distance, a row per
    model, points labelled with the block index."""
    _require(single, ["model", "block", "loss_increase", "neighbour_coupling",
                      "angular_distance"], "pruning_single")
    models = list(dict.fromkeys(single["model"]))
    fig = Figure(figsize=(9, 3.4 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for i, model in enumerate(models):
        part = single[single["model"] == model]
        for ax, col in zip(axes[i], ("neighbour_coupling", "angular_distance")):
            ax.scatter(part[col], part["loss_increase"], s=18)
            for _, r in part.iterrows():
                ax.annotate(str(int(r["block"])), (r[col], r["loss_increase"]), fontsize=7,
                            xytext=(3, 2), textcoords="offset points")
            ok = part[[col, "loss_increase"]].dropna()
            rho, p = _spearman(ok[col], ok["loss_increase"])
            ax.set_xlabel(col.replace("_", " "))
            ax.set_ylabel("loss increase (block removed alone)")
            ax.set_title(f"{model}: Spearman rho={rho:+.2f}, {_p(p)}", fontsize=10)
    return fig
