"""Depth-wise coupling: the L x L normalized mis-coupling heatmaps (paper Fig. 3)."""
from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from coupling.figures.common import (AXIS_L, AXIS_LP, CBAR_LABEL, _heatmap, _k, _layer_ticks,
                                     _quiet, color_limits, model_label)
from coupling.figures.scans import _row_in
from coupling.results.scan_output import ScanResult


def _prompt_row(scan: ScanResult, prompt_id) -> int:
    """Summary row of ``prompt_id`` in ``scan`` (its first prompt when absent or None)."""
    ids = [str(p) for p in scan.summary["prompt_id"]]
    return ids.index(str(prompt_id)) if prompt_id is not None and str(prompt_id) in ids else 0


def _layer_range(layers, n_layers: int) -> slice:
    """0-based slice of the 1-based inclusive ``layers = (first, last)``; all when None."""
    if layers is None:
        return slice(0, n_layers)
    first, last = (int(x) for x in layers)
    if not 1 <= first < last <= n_layers:
        raise ValueError(f"layers={tuple(layers)} must be (first, last) with 1 <= first < last "
                         f"<= {n_layers} (1-based, inclusive)")
    return slice(first - 1, last)


def depth_coupling_figure(scans: list[ScanResult], prompt_id=None, layers=None) -> Figure:
    """Columns = scans, rows = one prompt (``prompt_id``) and the mean over prompts.

    Every panel shares one color scale (``color_limits`` of the off-diagonal entries); the
    diagonal ``l = l'`` (trivially m~ = 0) is hatched grey so it does not set the scale.
    ``layers = (first, last)``, 1-based and inclusive, draws only that block of the grid
    (the paper's Fig. 3 shows blocks 9-16); the color scale is then that block's.
    """
    panels = []   # (scan, [(grid, row title)])
    for scan in scans:
        grids = np.asarray(scan.depth["normalized"], float)
        part = _layer_range(layers, grids.shape[-1])
        grids = grids[:, part, part]
        idx = _prompt_row(scan, prompt_id)
        pid = str(scan.summary["prompt_id"].iloc[idx])
        cells = [(grids[_row_in(scan.depth, scan, idx)], f"prompt {pid!r}")]
        if max(len(s.depth["normalized"]) for s in scans) > 1:
            with _quiet():
                cells.append((np.nanmean(grids, axis=0), f"mean over {len(grids)} prompts"))
        panels.append((scan, cells))
    n_rows, n_cols = len(panels[0][1]), len(panels)
    vmin, vmax = color_limits([g for _, cells in panels for g, _ in cells])
    norm = Normalize(vmin, vmax)
    fig = Figure(figsize=(4.6 * n_cols + 1.2, 4.2 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for c, (scan, cells) in enumerate(panels):
        for r, (grid, what) in enumerate(cells):
            ax = axes[r, c]
            start = 1 if layers is None else int(layers[0])
            L = grid.shape[0]
            im = _heatmap(ax, grid, norm, mask_diagonal=True, annotate=L <= 10, start=start)
            _layer_ticks(ax, L + start - 1, start=start)
            ax.set_xlabel(AXIS_LP)
            ax.set_ylabel(AXIS_L)
            ax.set_title(f"{model_label(scan.manifest)}\n{what}", fontsize=10)
    cb = fig.colorbar(im, ax=axes, shrink=0.85)
    cb.set_label(CBAR_LABEL)
    who = " vs ".join(model_label(s.manifest) for s in scans)
    traced = ("all tokens' (mean)" if scans[0].manifest.get("config", {}).get("token") == "all"
              else "the last token's")
    fig.suptitle(f"{who}\ndepth-wise coupling of {traced} block Jacobians "
                 f"(K={_k(scans[0])}); diagonal l = l' hatched", fontsize=11)
    return fig
