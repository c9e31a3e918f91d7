"""Figures of a finished scan (``coupling report DIR``) and of a training-checkpoint series.

``draw_figures(out_dir)`` reads a scan output directory (layout: ``coupling.results``) and
writes into ``out_dir/figures/``:

    depth_coupling.png     L x L normalized mis-coupling m~ (paper Fig. 3): one prompt + mean
    token_coupling.png     the three n x n token-wise maps (Fig. 4), if measured
    layer_curves.png       norm, windowed LSS, step size, logit-lens entropy vs depth (Fig. 24)
    pca_trajectories.png   each token's path through the layers in 2-D PCA (Fig. 16-17)
    singular_values.png    top-K singular values of J^l_tt, one line per layer
    summary.txt            model, prompts, mean m~ +/- std, LSS, ED

A figure whose input file is missing is skipped; the returned list says what was written.
With a second scan (``compare=DIR``, or a sibling directory holding the same model at the
other ``random_init``) the depth maps, curves and spectra show both, trained on the left.

``draw_training_figures([(step, dir), ...], out_dir)`` draws coupling and LSS against the
training step (Fig. 1b, Fig. 25) and layer-adjacency graphs at chosen steps (Fig. 1c-e).

Conventions: layers are 1-based in every label (block ``l`` maps ``X^{l-1}`` to ``X^l``;
hidden state ``0`` is the embedding); arrays are 0-based.  Mis-coupling m~ is in [0, 1],
lower = more strongly coupled; "coupling strength" is 1 - m~.  No pyplot: figures are plain
``matplotlib.figure.Figure`` objects (Agg), so drawing never touches a global backend.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .results import MANIFEST, ScanResult, atomic_write_bytes, read_scan_output

DPI = 120
CMAP = "viridis"           # m~ maps: dark = low m~ = strongly coupled, yellow = uncoupled
MTILDE = r"$\tilde{m}$"
CBAR_LABEL = r"normalized mis-coupling $\tilde{m}$ (lower = more coupled)"
AXIS_L = r"layer $l$ ($J^{l}$)"
AXIS_LP = r"layer $l'$ (singular vectors of $J^{l'}$)"
COLORS = ("tab:blue", "tab:orange")   # this scan, the compared scan
FIGURES_DIR = "figures"


# ------------------------------------------------------------------------------------------
# Reading and labelling
# ------------------------------------------------------------------------------------------
def load_scan(out_dir) -> ScanResult:
    """``read_scan_output`` with one-line errors for a missing directory or manifest."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"scan directory {out} does not exist: pass the --out folder of a "
                         "finished `coupling scan`")
    if not (out / MANIFEST).exists():
        raise ValueError(f"{out} holds no finished scan (no {MANIFEST}): pass the --out folder "
                         "of a finished `coupling scan`")
    return read_scan_output(out)


def model_label(manifest: dict) -> str:
    """Short model name for titles: hub id, or a folder's name; revision; random init."""
    m = manifest.get("model", {})
    ident = str(m.get("id") or "model")
    if os.path.isabs(ident) or ident.startswith(".") or ident.count("/") > 1:
        ident = Path(ident).name or ident
    rev = m.get("revision")
    if rev and not re.fullmatch(r"[0-9a-f]{40}", str(rev)):
        ident += f"@{rev}"
    if m.get("random_init"):
        ident += " (random init)"
    return ident


def _shape_label(manifest: dict) -> str:
    m = manifest.get("model", {})
    return f"L={m.get('n_layers', '?')}, d={m.get('d_model', '?')}"


def _k(scan: ScanResult):
    return scan.manifest.get("config", {}).get("k", "?")


def prompt_index(scan: ScanResult, prompt) -> int:
    """Row of ``prompt`` (an index 0..P-1 or a prompt id) in the scan's prompt order."""
    ids = [str(p) for p in scan.summary["prompt_id"]]
    n = len(ids)
    if isinstance(prompt, str) and not prompt.lstrip("-").isdigit():
        if prompt not in ids:
            raise ValueError(f"prompt id {prompt!r} is not in this scan: use an index 0..{n - 1} "
                             f"or one of {', '.join(ids[:5])}{'...' if n > 5 else ''}")
        return ids.index(prompt)
    i = int(prompt)
    if not 0 <= i < n:
        raise ValueError(f"--prompt {i} is out of range: this scan has {n} prompt(s), use 0..{n - 1}")
    return i


def _row_in(arrays: dict, scan: ScanResult, idx: int) -> int:
    """Row of the summary's prompt ``idx`` in an npz (matched by prompt id when stored)."""
    pid = str(scan.summary["prompt_id"].iloc[idx])
    ids = [str(p) for p in arrays.get("prompt_ids", [])]
    return ids.index(pid) if pid in ids else idx


def find_sibling(out_dir, manifest: dict) -> Path | None:
    """A sibling scan of the same model (id, L, d) at the other ``random_init``, else None.

    Among several, the one whose config (prompts, K, measures) matches best, then by name.
    """
    out = Path(out_dir).resolve()
    m = manifest.get("model", {})
    key = (m.get("id"), m.get("n_layers"), m.get("d_model"))
    cfg = manifest.get("config", {})
    best = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:          # an unreadable parent: nothing to compare with
        return None
    for d in entries:
        if d == out or d.name.startswith("."):     # hidden: partial scans being written
            continue
        try:
            other = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        om = other.get("model", {})
        if (om.get("id"), om.get("n_layers"), om.get("d_model")) != key:
            continue
        if bool(om.get("random_init")) == bool(m.get("random_init")):
            continue
        ocfg = other.get("config", {})
        score = sum(ocfg.get(k) == cfg.get(k) for k in ("prompts", "max_prompts", "k", "measures"))
        best.append((-score, d.name, d))
    return min(best)[2] if best else None


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------
def band(values: np.ndarray):
    """Mean and inter-quartile range over axis 0 ignoring nan: ``(mean, q25, q75)``."""
    v = np.asarray(values, dtype=float)
    with np.errstate(all="ignore"), _quiet():
        return np.nanmean(v, axis=0), np.nanpercentile(v, 25, axis=0), np.nanpercentile(v, 75, axis=0)


class _quiet:
    """Silence numpy's all-nan RuntimeWarnings (an all-nan column is a legitimate gap)."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def off_diagonal_mask(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def _fit_suptitle(fig: Figure):
    """Wrap the figure title to the figure's width: without bbox_inches="tight" (which draws
    every figure twice) a long title would be clipped at the edges."""
    title = getattr(fig, "_suptitle", None)
    if title is None:
        return
    width_pt = fig.get_figwidth() * 72
    per_line = max(20, int(width_pt / (0.55 * title.get_fontsize())))
    lines = [textwrap.fill(line, per_line) for line in title.get_text().split("\n")]
    title.set_text("\n".join(lines))


def save_figure(fig: Figure, path: Path) -> Path:
    """PNG at ``DPI`` written atomically (a half-written file never replaces a good one)."""
    _fit_suptitle(fig)
    buf = io.BytesIO()
    # constrained layout places everything (bbox_inches="tight" would draw each figure twice)
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _layer_ticks(ax, n_layers: int, axis: str = "both", start: int = 1):
    """Integer ticks; every layer up to 16, otherwise a readable subset."""
    if n_layers - start + 1 <= 16:
        ticks = list(range(start, n_layers + 1))
        if axis in ("x", "both"):
            ax.set_xticks(ticks)
        if axis in ("y", "both"):
            ax.set_yticks(ticks)
    else:
        if axis in ("x", "both"):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        if axis in ("y", "both"):
            ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))


def _log_y(ax):
    """Log y axis with plain numbers (0.2, 0.5, 1, 2, 5) instead of 2x10^-1 labels."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):   # label 2x and 5x between the decades, leave the rest unlabelled
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if mantissa in (2, 5) else ""
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _empty_note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="0.35", wrap=True)


# ------------------------------------------------------------------------------------------
# 1. Depth-wise coupling (Fig. 3)
# ------------------------------------------------------------------------------------------
def color_limits(grids, off_diagonal: bool = True) -> tuple[float, float]:
    """Shared (vmin, vmax) of the finite entries of every grid (off-diagonal ones only by
    default: the diagonal is trivially 0), within [0, 1]; a flat range is padded by 0.01."""
    vals = np.concatenate([np.asarray(g, float)[off_diagonal_mask(len(g))] if off_diagonal
                           else np.asarray(g, float).ravel() for g in grids])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-3:
        lo, hi = lo - 0.01, hi + 0.01
    return max(0.0, lo), min(1.0, hi)


def _heatmap(ax, grid: np.ndarray, norm, mask_diagonal: bool, annotate: bool, start: int = 1):
    """``grid[i, j]`` at (x = j + start, y = i + start); the diagonal hatched grey if masked."""
    n = grid.shape[0]
    data = np.ma.masked_invalid(np.asarray(grid, float))
    if mask_diagonal:
        data = np.ma.array(data, mask=np.ma.getmaskarray(data) | np.eye(n, dtype=bool))
    cmap = colormaps[CMAP].with_extremes(bad="0.85")
    lo, hi = start - 0.5, n + start - 0.5
    im = ax.imshow(data, cmap=cmap, norm=norm, extent=(lo, hi, hi, lo), interpolation="nearest")
    if mask_diagonal:
        for i in range(n):
            ax.add_patch(Rectangle((i + start - 0.5, i + start - 0.5), 1, 1, fill=False,
                                   hatch="///", edgecolor="0.6", linewidth=0))
    if annotate:
        mid = (norm.vmin + norm.vmax) / 2
        for i in range(n):
            for j in range(n):
                if not np.ma.is_masked(data[i, j]):
                    ax.text(j + start, i + start, f"{grid[i, j]:.2f}", ha="center", va="center",
                            fontsize=7, color="white" if grid[i, j] < mid else "black")
    return im


def _prompt_row(scan: ScanResult, prompt_id) -> int:
    """Summary row of ``prompt_id`` in ``scan`` (its first prompt when absent or None)."""
    ids = [str(p) for p in scan.summary["prompt_id"]]
    return ids.index(str(prompt_id)) if prompt_id is not None and str(prompt_id) in ids else 0


def depth_coupling_figure(scans: list[ScanResult], prompt_id=None) -> Figure:
    """Columns = scans, rows = one prompt (``prompt_id``) and the mean over prompts.

    Every panel shares one color scale (``color_limits`` of the off-diagonal entries); the
    diagonal ``l = l'`` (trivially m~ = 0) is hatched grey so it does not set the scale.
    """
    panels = []   # (scan, [(grid, row title)])
    for scan in scans:
        grids = np.asarray(scan.depth["normalized"], float)
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
            L = grid.shape[0]
            im = _heatmap(ax, grid, norm, mask_diagonal=True, annotate=L <= 10)
            _layer_ticks(ax, L)
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


# ------------------------------------------------------------------------------------------
# 2. Token-wise coupling (Fig. 4)
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 3. Per-layer curves (Fig. 24)
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 4. PCA trajectories (Fig. 16-17)
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 5. Singular values per layer
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 6. Text summary
# ------------------------------------------------------------------------------------------
def _mean_std(series) -> str:
    v = np.asarray(series, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.4f} +/- {std:.4f}"


def summary_lines(scan: ScanResult) -> list[str]:
    m, s = scan.manifest.get("model", {}), scan.summary
    cfg = scan.manifest.get("config", {})
    params = m.get("n_params")
    lines = [f"model        {model_label(scan.manifest)}  ({m.get('architecture', '?')}, "
             f"{_shape_label(scan.manifest)}"
             + (f", {params:,} params" if isinstance(params, int) else "") + ")",
             f"source       {m.get('id')}",
             f"prompts      {len(s)} from {cfg.get('prompts', '?')} "
             f"(mean {s['n_tokens'].mean():.1f} tokens); K = {cfg.get('k', '?')}, "
             f"traced token: {cfg.get('token', 'last')}"]
    rows = (("depth_mis_coupling_mean", "mis-coupling m~ (normalized, mean l != l')"),
            ("depth_mis_coupling_raw_mean", "mis-coupling m (raw)"),
            ("lss", "line-shape score LSS"),
            ("expodistance", "expodistance ED"),
            ("equidistance_cv", "equidistance CV"))
    for col, name in rows:
        if col in s:
            lines.append(f"{name:<44s} {_mean_std(s[col])}   (mean +/- std over prompts)")
    return lines


def write_summary(scans: list[ScanResult], path: Path, figures: list[Path]) -> Path:
    lines = ["coupling scan summary", ""] + summary_lines(scans[0])
    if len(scans) > 1:
        lines += ["", f"compared with {scans[1].out_dir}"] + summary_lines(scans[1])
    if figures:
        lines += ["", "figures: " + ", ".join(p.name for p in figures)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------
# The scan report
# ------------------------------------------------------------------------------------------
def _resolve_compare(out_dir: Path, scan: ScanResult, compare):
    if compare is False:
        return None
    if compare is None:
        sibling = find_sibling(out_dir, scan.manifest)
        return load_scan(sibling) if sibling is not None else None
    other = load_scan(compare)
    if Path(other.out_dir).resolve() == Path(out_dir).resolve():
        raise ValueError(f"--compare {compare} is the scan itself: pass a different directory")
    return other


def _ordered(scan: ScanResult, other: ScanResult | None) -> list[ScanResult]:
    """``[scan]`` or both, the trained one first (the left panel)."""
    if other is None:
        return [scan]
    if scan.manifest.get("model", {}).get("random_init") and \
            not other.manifest.get("model", {}).get("random_init"):
        return [other, scan]
    return [scan, other]


def draw_figures(out_dir, compare=None, prompt=0) -> list[Path]:
    """Draw every figure the scan's files allow into ``out_dir/figures/``; return the paths.

    ``compare``: another scan directory drawn beside this one; ``None`` looks for a sibling
    of the same model at the other ``random_init``; ``False`` draws this scan alone.
    ``prompt``: the prompt (index in the scan, or prompt id) of the single-prompt figures.
    """
    out = Path(out_dir)
    scan = load_scan(out)
    idx = prompt_index(scan, prompt)
    other = _resolve_compare(out, scan, compare)
    both = _ordered(scan, other)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(exist_ok=True)
    pid = str(scan.summary["prompt_id"].iloc[idx])
    written = []
    with_depth = [s for s in both if "normalized" in s.depth]
    if any(s is scan for s in with_depth):   # identity: ScanResult holds DataFrames
        written.append(save_figure(depth_coupling_figure(with_depth, pid),
                                   fig_dir / "depth_coupling.png"))
    if "self" in scan.tokens:
        written.append(save_figure(token_coupling_figure(scan, idx), fig_dir / "token_coupling.png"))
    with_curves = [s for s in both if len(s.layers)]
    if any(s is scan for s in with_curves):
        written.append(save_figure(layer_curves_figure(with_curves), fig_dir / "layer_curves.png"))
    if _has_pca(scan, idx):
        written.append(save_figure(pca_figure(scan, idx), fig_dir / "pca_trajectories.png"))
    if _has_spectra(scan):
        written.append(save_figure(singular_values_figure(both), fig_dir / "singular_values.png"))
    summary_scans = [scan] + ([other] if other is not None else [])
    written.append(write_summary(summary_scans, fig_dir / "summary.txt", written))
    return written


# ------------------------------------------------------------------------------------------
# Training dynamics (Fig. 1b-e, Fig. 25)
# ------------------------------------------------------------------------------------------
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


def _truncated(cmap, lo: float = 0.25, hi: float = 1.0):
    """The part [lo, hi] of ``cmap`` as a colormap of its own."""
    from matplotlib.colors import LinearSegmentedColormap
    return LinearSegmentedColormap.from_list(f"{cmap.name}_{lo}_{hi}", cmap(np.linspace(lo, hi, 256)))


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


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def main_report(args) -> int:
    compare = False if getattr(args, "no_compare", False) else getattr(args, "compare", None)
    for path in draw_figures(args.dir, compare=compare, prompt=getattr(args, "prompt", 0)):
        print(path)
    return 0
