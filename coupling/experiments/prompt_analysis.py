"""Coupling against prompt length and prompt difficulty, prompt by prompt (paper Fig. 10).

Input: a scan's ``summary.parquet`` (one row per prompt): ``n_tokens``, the per-prompt mean
normalized mis-coupling ``depth_mis_coupling_mean`` (m~, lower = more coupled) and, when the
prompt file had one, a ``difficulty`` column (the scan copies it from the prompt's meta).

For each available predictor (``n_tokens``, ``difficulty``) an ordinary least-squares line
``m~ = slope * x + intercept`` (``coupling.experiments.fits.linear_fit``: r, R^2, two-sided p of
slope = 0) and one figure, ``prompt_analysis.png``, with a scatter, the line and its 95%
confidence band per predictor; the numbers go to ``prompt_analysis.json``.

A difficulty given as words is mapped to ranks when every value is one of a known ordinal
scale (easy < medium < hard...); other categorical difficulties are drawn as box plots
without a fit.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coupling.experiments.fits import LinearFit, linear_fit

COUPLING = "depth_mis_coupling_mean"
PREDICTORS = {"n_tokens": "prompt length (tokens)", "difficulty": "prompt difficulty"}
ORDINAL = {"very easy": 0, "easy": 1, "medium": 2, "moderate": 2, "intermediate": 2,
           "hard": 3, "challenge": 3, "difficult": 3, "very hard": 4, "expert": 5}
MIN_POINTS = 3


@dataclass
class PromptAnalysis:
    """Fits of ``column`` against each predictor; ``notes`` says why one was skipped."""

    column: str
    n_prompts: int
    fits: dict = field(default_factory=dict)      # predictor -> LinearFit
    notes: dict = field(default_factory=dict)     # predictor -> reason no fit was made
    data: pd.DataFrame | None = None              # the columns used (x as plotted)

    def to_dict(self) -> dict:
        keep = ("slope", "intercept", "r", "r2", "p", "stderr", "intercept_stderr", "n")
        return {"column": self.column, "n_prompts": self.n_prompts,
                "fits": {k: {f: v for f, v in asdict(fit).items() if f in keep}
                         for k, fit in self.fits.items()},
                "notes": self.notes}


def difficulty_values(series: pd.Series) -> tuple[pd.Series, str | None]:
    """Numeric difficulty (numbers, or words of a known ordinal scale -> ranks).

    Returns ``(values, note)``: ``note`` is None when ``values`` is numeric, else says why
    the column stays categorical.
    """
    num = pd.to_numeric(series, errors="coerce")
    given = series.notna()
    if num[given].notna().all():
        return num.astype(float), None
    words = series[given].astype(str).str.strip().str.lower()
    if words.isin(list(ORDINAL)).all():
        return series.astype(str).str.strip().str.lower().map(ORDINAL).astype(float), None
    cats = sorted(words.unique())
    return series, (f"difficulty is categorical ({', '.join(cats[:5])}"
                    f"{'...' if len(cats) > 5 else ''}): shown as box plots, no linear fit; "
                    "give numbers (or easy/medium/hard) for a fit")


def analyze_prompts(summary: pd.DataFrame, column: str = COUPLING) -> PromptAnalysis:
    """Linear fits of ``summary[column]`` against ``n_tokens`` and ``difficulty``."""
    if column not in summary:
        raise ValueError(f"the scan summary has no {column!r} column: scan with the 'depth' "
                         "measure (or choose another column)")
    res = PromptAnalysis(column, len(summary))
    data = pd.DataFrame({column: pd.to_numeric(summary[column], errors="coerce")})
    for name in PREDICTORS:
        if name not in summary:
            if name == "difficulty":
                res.notes[name] = "no 'difficulty' in the prompt file"
            continue
        x, note = difficulty_values(summary[name]) if name == "difficulty" else \
            (pd.to_numeric(summary[name], errors="coerce").astype(float), None)
        data[name] = x
        if note:
            res.notes[name] = note
            continue
        ok = np.isfinite(x.to_numpy(float)) & np.isfinite(data[column].to_numpy(float))
        if ok.sum() < MIN_POINTS or np.unique(x[ok]).size < 2:
            res.notes[name] = (f"{int(ok.sum())} prompt(s) with {np.unique(x[ok]).size} "
                               f"distinct {name} value(s): a line needs >= {MIN_POINTS} "
                               "prompts and 2 distinct values")
            continue
        try:
            res.fits[name] = linear_fit(x[ok], data[column][ok])
        except ValueError as e:           # e.g. constant coupling
            res.notes[name] = str(e)
    res.data = data
    return res


# ------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------
def _fit_label(fit: LinearFit) -> str:
    return f"slope {fit.slope:.3g}, $R^2$={fit.r2:.2f}, p={fit.p:.2g}, n={fit.n}"


def prompt_analysis_figure(res: PromptAnalysis, title: str = ""):
    from matplotlib.figure import Figure

    panels = [p for p in PREDICTORS if res.data is not None and p in res.data]
    if not panels:
        raise ValueError("no predictor column (n_tokens, difficulty) in the scan summary")
    fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    y = res.data[res.column]
    for ax, name in zip(axes, panels):
        x = res.data[name]
        if name in res.fits:
            fit = res.fits[name]
            ax.scatter(x, y, s=18, alpha=0.75, color="tab:blue", label="prompts")
            grid = np.linspace(np.nanmin(x), np.nanmax(x), 100)
            lo, hi = fit.band(grid)
            ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.15, lw=0,
                            label=f"{100 * (1 - fit.alpha):.0f}% confidence band")
            ax.plot(grid, fit.predict(grid), color="tab:red", lw=1.8, label=_fit_label(fit))
            ax.legend(fontsize=7)
        elif res.notes.get(name, "").startswith("difficulty is categorical"):
            groups = {str(k): g.to_numpy(float) for k, g in y.groupby(x.astype(str))}
            ax.boxplot(list(groups.values()), tick_labels=list(groups), showmeans=True)
            ax.text(0.02, 0.98, "categorical: no fit", transform=ax.transAxes, va="top",
                    fontsize=8)
        else:
            ax.scatter(x, y, s=18, alpha=0.75, color="tab:blue")
            ax.text(0.02, 0.98, res.notes.get(name, "no fit"), transform=ax.transAxes,
                    va="top", fontsize=7, wrap=True)
        ax.set_xlabel(PREDICTORS[name])
        ax.set_ylabel(r"mis-coupling $\tilde{m}$ per prompt (lower = more coupled)"
                      if res.column == COUPLING else res.column)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"coupling vs prompt length and difficulty ({res.n_prompts} prompts)",
                 fontsize=10)
    return fig


def draw_prompt_analysis(scan_dir, out_dir=None, column: str = COUPLING) -> list[Path]:
    """Write ``prompt_analysis.png`` and ``prompt_analysis.json`` for a finished scan into
    ``out_dir`` (default ``scan_dir/figures``); returns the paths written."""
    from coupling.figures.common import model_label
    from coupling.figures.scans import load_scan

    scan = load_scan(scan_dir)
    res = analyze_prompts(scan.summary, column)
    out = Path(out_dir) if out_dir is not None else Path(scan_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_label(scan.manifest)}: coupling vs prompt length / difficulty " \
            f"({res.n_prompts} prompts)"
    fig = prompt_analysis_figure(res, title)
    fig.savefig(out / "prompt_analysis.png", dpi=110)
    (out / "prompt_analysis.json").write_text(json.dumps(res.to_dict(), indent=2))
    return [out / "prompt_analysis.png", out / "prompt_analysis.json"]


def main(argv=None) -> int:
    """``python -m coupling.experiments.prompt_analysis SCAN_DIR [OUT_DIR]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        print("usage: python -m coupling.experiments.prompt_analysis SCAN_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    for p in draw_prompt_analysis(*argv):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
