"""Token-wise coupling: the three n x n mis-coupling maps of one prompt (paper Fig. 4)."""
from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from coupling.figures.common import (CBAR_LABEL, _heatmap, _k, _layer_ticks, color_limits,
                                     model_label)
from coupling.figures.scans import _row_in
from coupling.results.scan_output import ScanResult

TOKEN_MAPS = (
    ("self", r"self: $J^{l}_{tt}$ vs $J^{l'}_{t't'}$",
     r"token $t$ ($J^{l}_{tt}$)", r"token $t'$ (vectors of $J^{l'}_{t't'}$)"),
    ("fixed_input", r"context, fixed input $t_1$ = first token",
     r"output token $t_2$ ($J^{l}_{t_1 t_2}$)", r"output token $t_2'$ (vectors of $J^{l'}_{t_1 t_2'}$)"),
    ("fixed_output", r"context, fixed output $t_2$ = last token",
     r"input token $t_1$ ($J^{l}_{t_1 t_2}$)", r"input token $t_1'$ (vectors of $J^{l'}_{t_1' t_2}$)"),
)


def token_coupling_figure(scan: ScanResult, prompt: int = 0) -> Figure:
    """The three ``n x n`` m~ maps of one prompt at layers (l, l'), one shared color scale."""
    tok = scan.tokens
    row = _row_in(tok, scan, prompt)
    n = int(tok["n_tokens"][row]) if "n_tokens" in tok else int(scan.summary["n_tokens"].iloc[prompt])
    l, lp = (int(x) for x in tok.get("token_layers", [[0, 0]] * (row + 1))[row])
    grids = [np.asarray(tok[name][row][:n, :n], float) for name, *_ in TOKEN_MAPS]
    # only l = l' makes the diagonal trivial (a Jacobian against its own vectors)
    mask = l == lp
    norm = Normalize(*color_limits(grids, off_diagonal=mask))
    fig = Figure(figsize=(15.5, 5.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, grid, (name, title, ylabel, xlabel) in zip(axes, grids, TOKEN_MAPS):
        im = _heatmap(ax, grid, norm, mask_diagonal=mask, annotate=n <= 8)
        _layer_ticks(ax, n)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label(CBAR_LABEL)
    pid = scan.summary["prompt_id"].iloc[prompt]
    fig.suptitle(f"{model_label(scan.manifest)}: token-wise coupling at layers l={l}, l'={lp} "
                 f"(K={_k(scan)}), prompt {pid!r}, {n} tokens (1 = first)", fontsize=11)
    return fig
