"""Top-K singular values of ``J^l_tt`` per layer, with the first value left out (the gap)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from coupling.figures.common import _k, _log_y, _quiet, model_label
from coupling.figures.layers import layer_matrix, undetermined_layers
from coupling.results.scan_output import ScanResult


def _has_spectra(scan: ScanResult) -> bool:
    sv = scan.depth.get("singular_values")
    return sv is not None and np.asarray(sv).ndim == 3 and np.asarray(sv).size > 0


def singular_values_figure(scans: list[ScanResult]) -> Figure:
    """Mean over prompts of sigma_1..sigma_K of J^l_tt, one line per layer coloured by depth."""
    scans = [s for s in scans if _has_spectra(s)]
    fig = Figure(figsize=(5.6 * len(scans) + 1.0, 4.8), layout="constrained")
    axes = fig.subplots(1, len(scans), squeeze=False, sharey=True)[0]
    L_max = max(np.asarray(s.depth["singular_values"]).shape[1] for s in scans)
    norm = Normalize(1, max(L_max, 2))
    cmap = colormaps["viridis"]
    with _quiet():
        fin = np.concatenate([np.nanmean(np.asarray(s.depth["singular_values"], float), 0).ravel()
                              for s in scans])
    fin = fin[np.isfinite(fin)]
    log_y = fin.size > 0 and fin.min() > 0 and fin.max() / fin.min() >= 10
    for ax, scan in zip(axes, scans):
        with _quiet():
            S = np.nanmean(np.asarray(scan.depth["singular_values"], float), axis=0)   # (L, K)
        L, K = S.shape
        ks = np.arange(1, K + 1)
        nxt, bad = _next_values(scan, L), undetermined_layers(scan)
        for l in range(L):
            ax.plot(ks, S[l], "--" if l + 1 in bad else "-", marker="o", ms=3,
                    color=cmap(norm(l + 1)), lw=1.5)
            if np.isfinite(nxt[l]):      # s_{K+1}, the first value left out: the gap
                ax.plot([K, K + 1], [S[l, -1], nxt[l]], ":", color=cmap(norm(l + 1)), lw=1)
                ax.plot(K + 1, nxt[l], "o", ms=4, mfc="white", color=cmap(norm(l + 1)))
            if l + 1 in bad:
                ax.plot(K, S[l, -1], "x", color="red", ms=9, mew=2)
        _spectra_note(ax, bad, np.isfinite(nxt).any(), len(scan.depth["singular_values"]))
        if log_y:
            _log_y(ax)
        ticks = np.arange(1, K + 2) if np.isfinite(nxt).any() else ks
        ax.set_xticks(ticks if K <= 16 else ticks[:: max(1, K // 10)])
        ax.set_xlabel(r"index $k$ of singular value $\sigma_k$")
        ax.set_title(f"{model_label(scan.manifest)} (mean of {len(scan.depth['singular_values'])} prompts)",
                     fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"$\sigma_k(J^{l}_{tt})$, last token")
    cb = fig.colorbar(ScalarMappable(norm, cmap=cmap), ax=list(axes), shrink=0.85)
    cb.set_label("layer l")
    cb.locator = MaxNLocator(integer=True)
    cb.update_ticks()
    who = " vs ".join(model_label(s.manifest) for s in scans)
    fig.suptitle(f"{who}: top-{_k(scans[0])} singular values of the block Jacobians per layer",
                 fontsize=11)
    return fig


def _next_values(scan: ScanResult, L: int) -> np.ndarray:
    """Mean over prompts of ``s_{K+1}`` per layer 1..L (layers.parquet ``sv_next``), nan if absent."""
    M = layer_matrix(scan.layers, "sv_next")
    if M.size == 0:
        return np.full(L, np.nan)
    with _quiet():
        mean = np.nanmean(M, axis=0)[1:1 + L]
    return np.concatenate([mean, np.full(L - len(mean), np.nan)])


def _spectra_note(ax, bad: dict, has_next: bool, n_prompts: int):
    """Legend: the hollow K+1 point, and which layers are dashed (undetermined top-K)."""
    if has_next:
        ax.plot([], [], "o", ms=4, mfc="white", color="0.3",
                label=r"$\sigma_{K+1}$, first value left out (dotted: the gap)")
    if bad:
        which = ", ".join(f"{l} ({n}/{n_prompts})" for l, n in sorted(bad.items()))
        ax.plot([], [], "--x", color="red", ms=8, mew=2,
                label=f"dashed, x: top-K subspace undetermined\n(gap within round-off) in layer {which}")
    if has_next or bad:
        ax.legend(fontsize=7, loc="upper right")
