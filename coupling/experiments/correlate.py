"""Correlate per-model coupling with benchmark scores (paper Fig. 1a, 8, 9, Tables 3-4).

Pipeline: scan outputs -> one row per model (``load_results``) -> join with a score table
(``join_scores``) -> optional subset (``apply_subset``) -> linear / exponential fits and
per-hyper-parameter correlations -> ``correlation.csv``, ``joined.csv`` and figures
(``run_correlate``; CLI ``coupling correlate``).  The table steps are
:mod:`coupling.experiments.model_table`, the fits :mod:`coupling.experiments.fits`, the figures
:mod:`coupling.experiments.correlate_figures`; this module drives them.

Conventions
-----------
* *Coupling* is the negative of mis-coupling (paper Section 5.4), so it is <= 0 and larger
  (closer to 0) means stronger coupling. A scan's ``summary.parquet`` holds per-prompt
  ``depth_mis_coupling_mean`` (normalized m~, Eq. 14, averaged over layer pairs) and
  ``depth_mis_coupling_raw_mean`` (raw m, Eq. 13); a model's coupling is minus their mean
  over prompts. ``models.parquet`` (Ray runs) holds those means as the summary signs them,
  ``mis_coupling_mean`` and ``mis_coupling_raw_mean``, negated here (tables written before
  issue #23 held the negated values as ``coupling_mean`` / ``coupling_raw_mean``: read too).
* Section 5.4 averages the raw m(A) for Fig. 1a, so ``coupling`` in the joined table is
  ``coupling_raw`` by default (``coupling_metric="normalized"`` picks the other).
* Hyper-parameter columns use the names of the paper's Table 1: ``params_b`` (billions),
  ``layers``, ``d_model``, ``train_tokens_t`` (trillions), ``fine_tuned``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from coupling.experiments.correlate_figures import (LABELS, _fit_text, plot_hyperparam_grid,
                                                    plot_r2_bars, plot_scatter)
from coupling.experiments.fits import hyperparameter_correlations
from coupling.experiments.model_table import (PAPER_TABLE, JoinReport, _id_as_model, apply_subset,
                                              join_scores, load_results, load_scores,
                                              normalize_model_table, select_coupling)

# --by choice -> column of the joined table.
BY_COLUMNS = {"score": None, "params": "params_b", "layers": "layers",
              "d_model": "d_model", "train_tokens": "train_tokens_t"}


# --------------------------------------------------------------------------- driver

def format_correlations(corr: pd.DataFrame, score_column: str) -> str:
    """Small text table of n, r, R², p per hyper-parameter."""
    lines = [f"hyper-parameter vs {score_column}",
             f"{'column':<16}{'n':>4}{'r':>9}{'R²':>8}{'p':>11}  note"]
    for name, row in corr.iterrows():
        lines.append(f"{name:<16}{int(row.n):>4}{row.r:>9.3f}{row.r2:>8.3f}{row.p:>11.3g}  "
                     f"{row.note}")
    return "\n".join(lines)


def build_table(results: Sequence[str | Path] | None, scores: str | Path | pd.DataFrame,
                id_column: str = "model", coupling_metric: str = "raw",
                subset: str | None = None, base_only: bool = False,
                echo: Callable[[str], None] = print) -> tuple[pd.DataFrame, JoinReport | None]:
    """Per-model analysis table: results joined with scores (or the score table alone when
    ``results`` is empty), ``coupling`` chosen, subset applied, one row per model id."""
    score_table = (scores.copy() if isinstance(scores, pd.DataFrame)
                   else load_scores(scores, id_column))
    report = None
    if results:
        table, report = join_scores(load_results(results), score_table, id_column)
        echo(report.describe())
    else:
        table = normalize_model_table(_id_as_model(score_table, id_column), "score table")
    table = apply_subset(select_coupling(table, coupling_metric), subset, base_only)
    dup = table["model"][table["model"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"model ids repeated after the join: {dup[:5]} (several revisions?); "
                         "keep one per model, e.g. --subset \"revision == 'main'\"")
    if subset or base_only:
        echo(f"{len(table)} model(s) after --subset/--base-only")
    return table, report


def run_correlate(results: Sequence[str | Path] | None, scores: str | Path | pd.DataFrame | None,
                  by: str = "score", subset: str | None = None,
                  out_dir: str | Path = "correlate_out",
                  score_columns: Sequence[str] = ("openllm_score",), id_column: str = "model",
                  base_only: bool = False, coupling_metric: str = "raw", alpha: float = 0.05,
                  echo: Callable[[str], None] = print) -> dict:
    """Join results with scores, fit, write ``correlation.csv``, ``joined.csv`` and figures.

    With no ``results`` the score table itself is analysed (hyper-parameters vs score, e.g.
    the paper's Table 1). ``by`` picks the main scatter: ``score`` plots score against
    coupling (Fig. 1a/8, with the exponential fit); any other choice plots coupling against
    that hyper-parameter (Fig. 9 left), or the score when there is no coupling (Fig. 9 right).
    Per score column: ``correlation_hyperparams.png`` (R² bars), ``hyperparams_vs_score.png``
    (one panel per hyper-parameter) and ``<y>_vs_<x>.png`` (suffixed ``_<score>`` when
    several score columns are given). Returns {"joined", "correlations", "fits", "files",
    "report"}.
    """
    if by not in BY_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(BY_COLUMNS)}, got {by!r}")
    if scores is None:
        raise ValueError("no score table: pass --scores FILE.csv or --paper-table")
    joined, report = build_table(results, scores, id_column, coupling_metric, subset,
                                 base_only, echo)
    missing = [c for c in score_columns if c not in joined.columns]
    if missing:
        raise ValueError(f"score column(s) {missing} not found (use --score-column); "
                         f"columns available: {', '.join(map(str, joined.columns))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"joined": out / "joined.csv", "correlation": out / "correlation.csv"}
    joined.to_csv(files["joined"], index=False)
    labels = {"coupling": f"coupling (− mean {coupling_metric} mis-coupling)"}
    corr_frames, fits = [], {}
    for score in score_columns:
        corr = hyperparameter_correlations(joined, score, alpha=alpha)
        corr_frames.append(corr.reset_index().assign(score=score))
        echo(format_correlations(corr, score))
        sfx = f"_{score}" if len(score_columns) > 1 else ""
        files[f"hyperparams{sfx}"] = out / f"correlation_hyperparams{sfx}.png"
        plot_r2_bars(corr, score, files[f"hyperparams{sfx}"], labels)
        files[f"grid{sfx}"] = out / f"hyperparams_vs_score{sfx}.png"
        plot_hyperparam_grid(joined, corr, score, files[f"grid{sfx}"], alpha, labels)
        xy = scatter_axes(joined, by, score)
        if isinstance(xy, str):
            echo(xy)
            fits[score] = None
        else:
            files[f"scatter{sfx}"] = out / f"{xy[1]}_vs_{xy[0]}{sfx}.png"
            fits[score] = _main_scatter(joined, xy, files[f"scatter{sfx}"], alpha, labels, echo)
    correlations = pd.concat(corr_frames, ignore_index=True)[
        ["score", "hyperparam", "n", "n_dropped", "r", "r2", "p", "slope", "intercept", "note"]]
    correlations.to_csv(files["correlation"], index=False)
    echo(f"wrote {', '.join(str(p) for p in files.values())}")
    return {"joined": joined, "correlations": correlations, "fits": fits, "files": files,
            "report": report}


def scatter_axes(joined: pd.DataFrame, by: str, score: str) -> tuple[str, str] | str:
    """(x, y) columns of the ``--by`` scatter, or a reason string when it cannot be drawn."""
    has_coupling = "coupling" in joined.columns and joined["coupling"].notna().any()
    column = BY_COLUMNS[by]
    if by == "score":
        return ("coupling", score) if has_coupling else (
            "no coupling values: skipping the coupling-vs-score scatter "
            "(see correlation_hyperparams.png for the hyper-parameters)")
    if column not in joined.columns:
        return f"no {column!r} column: skipping the --by {by} scatter"
    return column, ("coupling" if has_coupling else score)


def _main_scatter(joined: pd.DataFrame, xy: tuple[str, str], path: Path, alpha: float,
                  labels: dict, echo: Callable[[str], None]) -> dict:
    """Draw the main scatter; exponential fit only for score vs coupling (Fig. 8)."""
    x, y = xy
    names = {**LABELS, **labels}
    fits = plot_scatter(joined, x, y, path, alpha=alpha, with_exp=(x == "coupling"),
                        labels=labels, title=f"{names.get(y, y)} vs {names.get(x, x)}")
    if fits["linear"] is not None:
        echo(f"{y} vs {x}: {_fit_text(fits['linear'])}")
    efit = fits["exponential"]
    if efit is not None:
        echo(f"{y} = a·exp(b·{x}) + c: a = {efit.a:.4g}, b = {efit.b:.4g}, c = {efit.c:.4g}, "
             f"R² = {efit.r2:.3f}" if efit.converged else f"{efit.message}; showing linear only")
    return fits


# --------------------------------------------------------------------------- CLI



def cmd_correlate(args: argparse.Namespace) -> int:
    """Run ``correlate`` from parsed args; ValueError -> one-line message, exit code 2."""
    scores = args.scores
    if args.paper_table:
        if scores:
            print("coupling correlate: error: give --scores or --paper-table, not both",
                  file=sys.stderr)
            return 2
        scores = PAPER_TABLE
    try:
        run_correlate(args.results, scores, by=args.by, subset=args.subset, out_dir=args.out,
                      score_columns=args.score_columns or ["openllm_score"],
                      id_column=args.id_column, base_only=args.base_only,
                      coupling_metric=args.coupling_metric, alpha=args.alpha)
    except ValueError as exc:
        print(f"coupling correlate: error: {exc}", file=sys.stderr)
        return 2
    return 0
