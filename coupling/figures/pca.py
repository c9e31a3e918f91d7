"""Token trajectories ``x_i^0 .. x_i^L`` in the 2-D PCA plane (paper Fig. 16-17)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from coupling.figures.common import _truncated, model_label
from coupling.figures.scans import _row_in
from coupling.results.scan_output import ScanResult


def pca_figure(scan: ScanResult, prompt: int = 0) -> Figure:
    """Each token's path x_i^0 .. x_i^L in the PCA plane fitted on the last layer's states."""
    row = _row_in(scan.pca, scan, prompt)
    n = int(scan.pca["n_tokens"][row])
    P = np.asarray(scan.pca["projections"][row][:, :n, :], float)    # (L+1, n, 2)
    L = P.shape[0] - 1
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    cmap = _truncated(colormaps["plasma"], 0.0, 0.85)   # no pale yellow on white
    tok_norm = Normalize(1, max(n - 1, 2))
    for i in range(n):
        last = i == n - 1
        color = "black" if last else cmap(tok_norm(i + 1))
        ax.plot(P[:, i, 0], P[:, i, 1], "-", color=color, lw=2.4 if last else 1.2,
                alpha=1.0 if last else 0.8, zorder=3 if last else 2,
                label="last token" if last else None)
        ax.plot(P[0, i, 0], P[0, i, 1], "o", color=color, ms=6, mfc="white", zorder=4)
        ax.plot(P[-1, i, 0], P[-1, i, 1], "s", color=color, ms=6, zorder=4)
    _label_path(ax, P[:, -1, :])
    ax.plot([], [], "o", color="0.3", mfc="white", label="start (embedding, layer 0)")
    ax.plot([], [], "s", color="0.3", label=f"end (layer {L})")
    sm = ScalarMappable(tok_norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, shrink=0.8)
    cb.set_label("token position (1 = first; last token in black)")
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("PC 1 (fitted on the last layer's states)")
    ax.set_ylabel("PC 2")
    ax.grid(alpha=0.3)
    pid = scan.summary["prompt_id"].iloc[prompt]
    ax.set_title(f"{model_label(scan.manifest)}: token trajectories through {L} layers, "
                 f"prompt {pid!r}", fontsize=10)
    return fig


def _has_pca(scan: ScanResult, prompt: int) -> bool:
    """Projections stored and finite for this prompt (a 1-token prompt has none)."""
    if "projections" not in scan.pca:
        return False
    row = _row_in(scan.pca, scan, prompt)
    return bool(np.isfinite(np.asarray(scan.pca["projections"][row], float)).any())


def _label_path(ax, path: np.ndarray, min_frac: float = 0.04):
    """Layer numbers along a path, skipping points too close to the last label (no pile-ups)."""
    span = np.ptp(path, axis=0)
    span[span == 0] = 1.0
    last = None
    for l, pt in enumerate(path):
        if last is not None and np.all(np.abs(pt - last) / span < min_frac) and l != len(path) - 1:
            continue
        ax.annotate(str(l), tuple(pt), xytext=(4, 4), textcoords="offset points", fontsize=8)
        last = pt
