"""Figures of ``coupling correlate``: labelled scatters with fits, R² bars, and one panel
per hyper-parameter (paper Fig. 1a, 8, 9)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coupling.experiments.fits import LinearFit, exponential_fit, linear_fit

LABELS = {"coupling": "coupling (− mean mis-coupling)", "params_b": "parameters (B)",
          "layers": "layers", "d_model": "d_model", "train_tokens_t": "training tokens (T)",
          "openllm_score": "Open LLM Leaderboard score"}


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
