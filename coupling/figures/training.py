"""Training dynamics of a checkpoint series (Fig. 1b-e, Fig. 25).

``draw_training_figures([(step, dir), ...], out_dir)`` draws coupling and LSS against the
training step (Fig. 1b, Fig. 25) and layer-adjacency graphs at chosen steps (Fig. 1c-e).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from coupling.figures.common import (COLORS, _quiet, _shape_label, _truncated, model_label,
                                     save_figure)
from coupling.figures.layers import _missing_curve_note, layer_matrix
from coupling.figures.scans import load_scan
from coupling.results.scan_output import ScanResult


def load_runs(run_dirs) -> list[tuple[int, ScanResult]]:
    """``[(step, ScanResult)]`` sorted by step; one-line errors for bad input."""
    runs = list(run_dirs or [])
    if not runs:
        raise ValueError("no checkpoint scans given: pass [(step, scan_dir), ...]")
    out = []
    for item in runs:
        try:
            step, d = item
            step = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"run entry {item!r} is not a (step, scan_dir) pair") from None
        out.append((step, load_scan(d)))
    steps = [s for s, _ in out]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate training steps {sorted(steps)}: give each checkpoint once")
    return sorted(out, key=lambda t: t[0])


def _step_axis(ax, steps):
    """Log x; symlog (linear below the smallest positive step) when step 0 is present."""
    pos = [s for s in steps if s > 0]
    if min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=min(pos) if pos else 1, linscale=0.5)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("training step")


def adjacency_weights(normalized) -> np.ndarray:
    """Coupling strength of each layer pair: ``1 - (m~ + m~^T) / 2`` averaged over prompts.

    ``normalized``: ``(P, L, L)`` or ``(L, L)``.  Diagonal set to nan (no self-edges).
    """
    M = np.asarray(normalized, float)
    if M.ndim == 3:
        with _quiet():
            M = np.nanmean(M, axis=0)
    W = 1.0 - (M + M.T) / 2
    W[np.eye(len(W), dtype=bool)] = np.nan
    return W


def adjacency_figure(W: np.ndarray, title: str, lo: float, hi: float) -> Figure:
    """Layers on a circle (1 at the top, clockwise); edges coloured, widened and made opaque
    in proportion to the pair's coupling strength on the shared scale [lo, hi]."""
    L = len(W)
    theta = np.pi / 2 - 2 * np.pi * np.arange(L) / L
    xy = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    cmap, norm = colormaps["Blues"], Normalize(lo, hi)
    fig = Figure(figsize=(6.8, 6.0), layout="constrained")
    ax = fig.subplots()
    pairs = [(W[i, j], i, j) for i in range(L) for j in range(i + 1, L) if np.isfinite(W[i, j])]
    for w, i, j in sorted(pairs):        # strongest edges drawn last (on top)
        t = float(np.clip(norm(w), 0, 1))
        ax.plot(*zip(xy[i], xy[j]), color=cmap(0.25 + 0.75 * t), lw=0.4 + 4.6 * t,
                alpha=0.08 + 0.92 * t, solid_capstyle="round", zorder=1)
    inside = L <= 24       # numbers fit inside the nodes; beyond that, outside and sparser
    ax.scatter(xy[:, 0], xy[:, 1], s=300 if inside else 40, c="white", edgecolors="black",
               linewidths=1.2, zorder=3)
    every = 1 if L <= 32 else max(1, L // 16)
    for l in range(0, L, every):
        ax.text(*(xy[l] if inside else 1.1 * xy[l]), str(l + 1), ha="center", va="center",
                fontsize=9 if inside else 7, zorder=4)
    ax.set_aspect("equal")
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.axis("off")
    cb = fig.colorbar(ScalarMappable(norm, cmap=_truncated(cmap)), ax=ax, shrink=0.75)
    cb.set_label(r"coupling strength $1-\tilde{m}$ (symmetrised, mean over prompts)")
    ax.set_title(title, fontsize=10)
    return fig


def _default_adjacency_steps(steps: list[int]) -> list[int]:
    """First, a middle (geometric, as on a log axis) and last checkpoint, like Fig. 1c-e."""
    if len(steps) <= 3:
        return list(steps)
    pos = [max(s, 1) for s in steps]
    target = math.sqrt(pos[0] * pos[-1])
    mid = min(steps[1:-1], key=lambda s: abs(math.log(max(s, 1)) - math.log(target)))
    return [steps[0], mid, steps[-1]]


def adjacency_selection(steps: list[int], requested=None) -> list[int]:
    """The steps to draw adjacency graphs for: ``requested`` (validated) or the default."""
    if requested is None:
        return _default_adjacency_steps(sorted(steps))
    chosen = [int(s) for s in requested]
    missing = [s for s in chosen if s not in steps]
    if missing:
        raise ValueError(f"adjacency step(s) {missing} not among the scanned steps "
                         f"{sorted(steps)}: choose from those")
    return chosen


def _training_title(runs) -> str:
    """The model of a checkpoint series: its id without revision, or the checkpoints' common
    folder (``.../pythia/step-1000`` and ``.../pythia/step-2000`` -> ``pythia``)."""
    ids = [str(r.manifest.get("model", {}).get("id") or "model") for _, r in runs]
    if len(set(ids)) == 1:
        m = runs[-1][1].manifest.get("model", {})
        label = model_label({"model": {**m, "revision": None, "random_init": False}})
    else:
        try:
            label = Path(os.path.commonpath(ids)).name or "checkpoints"
        except ValueError:   # mixed absolute/relative ids
            label = os.path.commonprefix(ids).rstrip("/-_") or "checkpoints"
    return f"{label} ({_shape_label(runs[-1][1].manifest)})"


def coupling_vs_step_figure(runs) -> Figure:
    steps = [s for s, _ in runs]
    strength = [1 - np.asarray(r.summary["depth_mis_coupling_mean"], float) for _, r in runs]
    stats = np.array([[np.nanmean(v), *np.nanpercentile(v, [25, 75])] for v in strength])
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(steps, stats[:, 1], stats[:, 2], color=COLORS[0], alpha=0.25, lw=0,
                    label="inter-quartile range over prompts")
    ax.plot(steps, stats[:, 0], "-o", color=COLORS[0], lw=2, label="mean over prompts")
    _step_axis(ax, steps)
    ax.set_ylabel(r"coupling strength $1-\tilde{m}$ (higher = more coupled)")
    sec = ax.secondary_yaxis("right", functions=(lambda y: 1 - y, lambda m: 1 - m))
    sec.set_ylabel(r"mean normalized mis-coupling $\tilde{m}$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{_training_title(runs)}: depth-wise coupling vs training step", fontsize=10)
    return fig


def lss_vs_step_figure(runs) -> Figure:
    """Left: prompt-mean LSS vs step (Fig. 25 left); right: windowed LSS vs depth per step."""
    steps = [s for s, _ in runs]
    windowed = [(step, layer_matrix(r.layers, "windowed_lss")) for step, r in runs]
    windowed = [(step, M) for step, M in windowed if M.size and np.isfinite(M).any()]
    fig = Figure(figsize=(12.5 if windowed else 7.5, 5.0), layout="constrained")
    axes = fig.subplots(1, 2 if windowed else 1, squeeze=False)[0]
    ax = axes[0]
    lss = [np.asarray(r.summary["lss"], float) if "lss" in r.summary else np.array([np.nan])
           for _, r in runs]
    with _quiet():
        stats = np.array([[np.nanmean(v), *np.nanpercentile(v, [25, 75])] for v in lss])
    ax.fill_between(steps, stats[:, 1], stats[:, 2], color=COLORS[1], alpha=0.25, lw=0,
                    label="inter-quartile range over prompts")
    ax.plot(steps, stats[:, 0], "-o", color=COLORS[1], lw=2, label="mean over prompts")
    _step_axis(ax, steps)
    ax.set_ylabel("line-shape score LSS (1 = straight; whole trajectory)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("LSS vs training step", fontsize=10)
    if windowed:
        _windowed_panel(fig, axes[1], windowed, steps)
    else:
        ax.text(0.02, 0.02, _missing_curve_note(runs[-1][1], "windowed_lss").replace("\n", " "),
                transform=ax.transAxes, fontsize=7, color="0.4")
    fig.suptitle(f"{_training_title(runs)}: trajectory linearity through training", fontsize=11)
    return fig


def _windowed_panel(fig, ax, windowed, steps):
    """Windowed LSS vs depth, one line per checkpoint coloured by (log) step."""
    pos = [max(s, 1) for s in steps]
    norm = LogNorm(min(pos), max(max(pos), min(pos) * 10))
    cmap = colormaps["viridis"]
    for step, M in windowed:
        with _quiet():
            ax.plot(np.arange(M.shape[1]), np.nanmean(M, axis=0), lw=1.8,
                    color=cmap(norm(max(step, 1))))
    cb = fig.colorbar(ScalarMappable(norm, cmap=cmap), ax=ax)
    cb.set_label("training step")
    ax.set_xlabel("centre of the layer window (hidden state index)")
    ax.set_ylabel("windowed LSS, last token (mean over prompts)")
    ax.grid(alpha=0.3)
    ax.set_title("windowed LSS vs depth at each checkpoint", fontsize=10)


def draw_training_figures(run_dirs, out_dir, adjacency_steps=None) -> list[Path]:
    """Figures of a checkpoint series ``[(step, scan_dir), ...]`` written into ``out_dir``.

    ``coupling_vs_step.png`` (Fig. 1b), ``lss_vs_step.png`` (Fig. 25) and one
    ``adjacency_step<N>.png`` per step in ``adjacency_steps`` (default: first, middle, last;
    Fig. 1c-e), all adjacency graphs on one shared coupling-strength scale.
    """
    runs = load_runs(run_dirs)
    by_step = dict(runs)
    chosen = adjacency_selection(list(by_step), adjacency_steps)   # fail before drawing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if all(r.summary["depth_mis_coupling_mean"].notna().any() for _, r in runs):
        written.append(save_figure(coupling_vs_step_figure(runs), out / "coupling_vs_step.png"))
    if any("lss" in r.summary and r.summary["lss"].notna().any() for _, r in runs):
        written.append(save_figure(lss_vs_step_figure(runs), out / "lss_vs_step.png"))
    graphs = {s: adjacency_weights(by_step[s].depth["normalized"]) for s in chosen
              if "normalized" in by_step[s].depth}
    if graphs:
        vals = np.concatenate([W[np.isfinite(W)] for W in graphs.values()])
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.01, hi + 0.01
        for s, W in graphs.items():
            title = (f"{_training_title(runs)} at step {s}: layer adjacency by coupling\n"
                     f"nodes = layers (1 at the top, clockwise); shared scale over steps "
                     f"{', '.join(map(str, graphs))}")
            written.append(save_figure(adjacency_figure(W, title, lo, hi),
                                       out / f"adjacency_step{s}.png"))
    return written
