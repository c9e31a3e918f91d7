"""Per-layer curves: norm, windowed LSS, step size, logit-lens entropy vs depth (Fig. 24)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from coupling.figures.common import (COLORS, _empty_note, _layer_ticks, _log_y, _shape_label, band,
                                     model_label)
from coupling.results.scan_output import ScanResult

LAYER_PANELS = (
    ("norm", r"norm $\|x^l\|$ (last token)", "log"),
    ("windowed_lss", "windowed LSS (last token)", "linear"),
    ("step", r"step size $\|x^l - x^{l-1}\|$ (last token)", "linear"),
    ("entropy", "logit-lens entropy (nats, last token)", "linear"),
)


def layer_matrix(layers, column: str) -> np.ndarray:
    """``(P, L+1)`` values of ``column`` (prompts in file order, layers 0..L)."""
    if layers is None or len(layers) == 0 or column not in layers:
        return np.empty((0, 0))
    table = layers.pivot(index="prompt_id", columns="layer", values=column)
    order = list(dict.fromkeys(layers["prompt_id"]))
    return table.loc[order].to_numpy(dtype=float)


def layer_curves_figure(scans: list[ScanResult]) -> Figure:
    """Mean over prompts (line) and inter-quartile band, one panel per measure."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (col, title, yscale) in zip(axes, LAYER_PANELS):
        drawn = False
        for scan, color in zip(scans, COLORS):
            M = layer_matrix(scan.layers, col)
            if M.size == 0 or not np.isfinite(M).any():
                continue
            mean, q25, q75 = band(M)
            x = np.arange(M.shape[1])
            ax.plot(x, mean, color=color, lw=2, marker="o", ms=3,
                    label=f"{model_label(scan.manifest)} (mean of {M.shape[0]})")
            ax.fill_between(x, q25, q75, color=color, alpha=0.25, lw=0)
            drawn = True
        if drawn:
            if yscale == "log" and _spans_decade(scans, col):
                _log_y(ax)
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            ax.legend(fontsize=8)
        else:
            _empty_note(ax, _missing_curve_note(scans[0], col))
            ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("hidden state after layer l (0 = embedding)")
        _layer_ticks(ax, _n_layers(scans[0]), axis="x", start=0)
        ax.grid(alpha=0.3)
        _mark_undetermined(ax, scans, legend=drawn)
    fig.suptitle(f"{model_label(scans[0].manifest)} ({_shape_label(scans[0].manifest)}): "
                 "per-layer measures, mean over prompts with inter-quartile band", fontsize=11)
    return fig


def undetermined_layers(scan: ScanResult) -> dict:
    """``{l: prompts}``: layers whose top-K subspace was undetermined at the Jacobian's
    precision (``s_K / s_{K+1}`` within round-off; layers.parquet ``sv_gap_undetermined``)
    in that many prompts."""
    layers = scan.layers
    if layers is None or "sv_gap_undetermined" not in layers:
        return {}
    flagged = layers[layers["sv_gap_undetermined"].fillna(False).astype(bool)]
    return {int(l): int(n) for l, n in flagged.groupby("layer").size().items()}


def _mark_undetermined(ax, scans, legend: bool):
    """Red dotted lines at the layers whose top-K subspace was undetermined in any prompt:
    the coupling numbers of these layers are arbitrary within round-off."""
    bad = sorted({l for scan in scans for l in undetermined_layers(scan)})
    for i, l in enumerate(bad):
        ax.axvline(l, color="red", ls=":", lw=1.2, alpha=0.8,
                   label="top-K subspace undetermined\n(s_K ~ s_K+1 within round-off)"
                   if i == 0 else None)
    if bad and legend:
        ax.legend(fontsize=8)


def _spans_decade(scans, col) -> bool:
    """Positive values over at least a factor 10: worth a log axis."""
    vals = np.concatenate([layer_matrix(s.layers, col).ravel() for s in scans])
    vals = vals[np.isfinite(vals)]
    return vals.size > 0 and vals.min() > 0 and vals.max() / vals.min() >= 10


def _n_layers(scan: ScanResult) -> int:
    L = scan.manifest.get("model", {}).get("n_layers")
    if L is None and len(scan.layers):
        L = int(scan.layers["layer"].max())
    return int(L or 1)


def _missing_curve_note(scan: ScanResult, col: str) -> str:
    if col == "windowed_lss":
        w = scan.manifest.get("config", {}).get("lss_window", 11)
        return (f"windowed LSS needs at least {w} hidden states\n"
                f"(window {w}); this model has {_n_layers(scan) + 1}")
    if col == "entropy":
        return "logit-lens entropy not measured\n(the model has no LM head)"
    return f"{col} not measured"
