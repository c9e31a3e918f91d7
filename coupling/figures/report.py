"""The figures of a finished scan (``coupling report DIR``) and its text summary.

``draw_figures(out_dir)`` reads a scan output directory (layout: ``coupling.results.scan_output``) and
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

Each figure family is drawn by its own module of :mod:`coupling.figures`; the figures of a
training-checkpoint series are :func:`coupling.figures.training.draw_training_figures`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from coupling.figures.common import _shape_label, model_label, save_figure
from coupling.figures.depth import depth_coupling_figure
from coupling.figures.layers import layer_curves_figure
from coupling.figures.pca import _has_pca, pca_figure
from coupling.figures.scans import find_sibling, load_scan, prompt_index
from coupling.figures.spectra import _has_spectra, singular_values_figure
from coupling.figures.tokens import token_coupling_figure
from coupling.results.owned import atomic_write
from coupling.results.scan_output import ScanResult

FIGURES_DIR = "figures"


# ------------------------------------------------------------------------------------------
# Text summary
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
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
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
# Command line
# ------------------------------------------------------------------------------------------
def main_report(args) -> int:
    compare = False if getattr(args, "no_compare", False) else getattr(args, "compare", None)
    for path in draw_figures(args.dir, compare=compare, prompt=getattr(args, "prompt", 0)):
        print(path)
    return 0
