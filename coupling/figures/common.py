"""Labels, colours and drawing helpers shared by every figure (:mod:`coupling.figures`)."""
from __future__ import annotations

import io
import math
import os
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from coupling.results.owned import atomic_write
from coupling.results.scan_output import ScanResult

DPI = 120
CMAP = "viridis"           # m~ maps: dark = low m~ = strongly coupled, yellow = uncoupled
MTILDE = r"$\tilde{m}$"
CBAR_LABEL = r"normalized mis-coupling $\tilde{m}$ (lower = more coupled)"
AXIS_L = r"layer $l$ ($J^{l}$)"
AXIS_LP = r"layer $l'$ (singular vectors of $J^{l'}$)"
COLORS = ("tab:blue", "tab:orange")   # this scan, the compared scan


# ------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------
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
    atomic_write(path, buf.getvalue())
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


def _truncated(cmap, lo: float = 0.25, hi: float = 1.0):
    """The part [lo, hi] of ``cmap`` as a colormap of its own."""
    from matplotlib.colors import LinearSegmentedColormap
    return LinearSegmentedColormap.from_list(f"{cmap.name}_{lo}_{hi}", cmap(np.linspace(lo, hi, 256)))
