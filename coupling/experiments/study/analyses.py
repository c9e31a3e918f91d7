"""The controlled study's analyses (docs/study.md): every figure and table, written to one folder.

Input tables (written by :mod:`coupling.experiments.study.runner`):

* ``lm``: one row per model x checkpoint step x scan variant (``scan``: ``main`` = K=10 with
  the final norm inside the last block; ``k2``, ``raw``...), with the model's factor and
  hyper-parameters, held-out metrics and the scan's coupling measures;
* ``vit``: one row per ViT of the stochastic-depth x weight-decay grid;
* ``pruning``: loss after removing 0, 1, 2... blocks per removal order;
* ``pruning_single``: loss increase when each block is removed alone, with the block's
  neighbour coupling and angular distance.

Analyses (numbered as in the issue): 1 coupling and the other predictors vs held-out
performance (R^2, p, bootstrap CIs, partial correlation at fixed parameter count);
2 coupling vs training step; 3 LSS and expodistance vs step; 4 ViT stochastic depth;
5 pruning.  Every number is reported as the data give it, with n and p; nothing is filtered
to make a point.  The tables are computed in :mod:`coupling.experiments.study.study_stats`, the figures
drawn in :mod:`coupling.experiments.study.study_figures`; this module's
:func:`write_analyses` draws and writes everything to one folder.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from coupling.experiments.study.study_figures import (fig_coupling_vs_step, fig_performance,
                                                      fig_pruning, fig_regularity_vs_step,
                                                      fig_single_block, fig_vit)
from coupling.experiments.study.study_stats import (TARGETS, final_main, markdown_table,
                                                    partial_table, predictors, pruning_summary,
                                                    single_block_summary, step_table, vit_tables)
from coupling.figures.common import save_figure
from coupling.results.owned import atomic_write

__all__ = ["P_FORMATS", "write_analyses"]


P_FORMATS = {"p": ".2g", "spearman_p": ".2g", "p_neighbour_coupling": ".2g",
             "p_angular_distance": ".2g"}


class _Writer:
    """Collects the markdown and the paths while the analyses write their files."""

    def __init__(self, out_dir: Path):
        self.out = Path(out_dir)
        self.md: list[str] = []
        self.paths: dict[str, Path] = {}

    def figure(self, name: str, fig: Figure, caption: str = ""):
        self.paths[f"figures/{name}"] = save_figure(fig, self.out / "figures" / f"{name}.png")
        self.md.append(f"![{caption or name}](figures/{name}.png)\n")

    def table(self, name: str, df: pd.DataFrame, caption: str = ""):
        path = self.out / "tables" / f"{name}.csv"
        atomic_write(path, df.to_csv(index=False).encode())
        self.paths[f"tables/{name}"] = path
        if caption:
            self.md.append(f"*{caption}* (`tables/{name}.csv`)\n")
        self.md.append((markdown_table(df, P_FORMATS) if len(df) else "_(no rows)_") + "\n")

    def text(self, line: str):
        self.md.append(line + "\n")


def _present(tables: dict, name: str) -> pd.DataFrame | None:
    df = tables.get(name)
    return df if isinstance(df, pd.DataFrame) and not df.empty else None


def write_analyses(tables: dict, out_dir, targets=TARGETS, n_boot: int = 2000) -> dict:
    """Every analysis whose table is present: PNGs in ``out_dir/figures``, CSVs in
    ``out_dir/tables`` and ``out_dir/analyses.md`` (all tables in markdown, figure links).
    A missing or empty table gives a line saying which analyses were skipped.  Returns
    ``{name: path}`` of every file written (``"analyses.md"`` included)."""
    w = _Writer(out_dir)
    w.text("# Study analyses")
    _lm_sections(w, _present(tables, "lm"), targets, n_boot)
    w.text("## 4. Vision transformers: stochastic depth x weight decay")
    _section(w, tables, "vit", _vit_section)
    w.text("## 5. Pruning")
    _section(w, tables, "pruning", _pruning_section)
    _section(w, tables, "pruning_single", _single_block_section)
    md = Path(out_dir) / "analyses.md"
    atomic_write(md, "\n".join(w.md).encode())
    w.paths["analyses.md"] = md
    return w.paths


def _section(w: _Writer, tables: dict, name: str, draw):
    """``draw(w, table)`` when the table is present, else the line saying it was skipped."""
    df = _present(tables, name)
    if df is None:
        w.text(f"_Skipped: the `{name}` table is missing or empty._")
    else:
        draw(w, df)


def _vit_section(w: _Writer, vit: pd.DataFrame):
    w.figure("vit", fig_vit(vit), "ViT coupling vs stochastic depth and accuracy")
    for name, df in vit_tables(vit).items():
        w.table(name, df, name)


def _pruning_section(w: _Writer, pr: pd.DataFrame):
    w.figure("pruning", fig_pruning(pr), "loss increase vs blocks removed")
    w.table("pruning_summary", pruning_summary(pr),
            "loss increase after 1, 2, 3 blocks removed; rank 1 = best order")


def _single_block_section(w: _Writer, single: pd.DataFrame):
    w.figure("single_block", fig_single_block(single), "single-block removal")
    w.table("single_block_summary", single_block_summary(single),
            "Spearman rho of single-block loss increase with each signal")


def _lm_sections(w: _Writer, lm: pd.DataFrame | None, targets, n_boot: int):
    titles = ("## 1. Coupling vs held-out performance", "## 2. Coupling vs training step",
              "## 3. LSS and expodistance vs training step")
    if lm is None:
        for t in titles:
            w.text(t)
            w.text("_Skipped: the `lm` table is missing or empty._")
        return
    w.text(titles[0])
    fm = final_main(lm)
    present = [t for t in targets if t in fm and fm[t].notna().any()]
    if fm.empty or not present:
        w.text("_Skipped: no final checkpoint with a main-scan coupling and a metric._")
    for target in present:
        w.figure(f"performance_{target}", fig_performance(fm, target), target)
        w.table(f"predictors_{target}", predictors(fm, target, n_boot=n_boot),
                f"{target} ~ predictor across {len(fm)} models (bootstrap 95% CIs)")
    if present:
        w.table("partial", partial_table(fm, present),
                "partial correlation of coupling with each metric, controls held fixed")
    w.text(titles[1])
    w.figure("coupling_vs_step", fig_coupling_vs_step(lm), "coupling vs step")
    w.table("step_table", step_table(lm), "peak, end and monotonicity per model and scan")
    w.text(titles[2])
    w.figure("regularity_vs_step", fig_regularity_vs_step(lm), "LSS and expodistance vs step")
