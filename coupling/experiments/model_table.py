"""The per-model table of ``coupling correlate``: scan outputs in, one row per model out.

Scan outputs -> one row per model (``load_results``) -> join with a score table
(``join_scores``, with a :class:`JoinReport` of what did not match) -> the coupling column
chosen (``select_coupling``) -> optional subset (``apply_subset``).  Conventions (coupling =
minus mis-coupling, column names of the paper's Table 1) are in :mod:`coupling.experiments.correlate`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from coupling.errors import first_line

PAPER_TABLE = Path(__file__).resolve().parents[1] / "data" / "paper_table1.csv"
# Columns a scan measures; on a join overlap the scan's value wins for these and the
# score table's (published, nominal) value wins for everything else.
MEASURED = ("coupling", "coupling_raw", "coupling_normalized", "coupling_std", "lss",
            "expodistance", "n_prompts")


def _as_bool(series: pd.Series) -> pd.Series:
    """true/false/1/0/yes/no (any case) -> bool; anything else -> ValueError."""
    if series.dtype == bool:
        return series
    mapping = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "1.0": True, "0.0": False}
    text = series.astype(str).str.strip().str.lower()
    bad = sorted(set(text[~text.isin(mapping.keys())]))
    if bad:
        raise ValueError(f"column {series.name!r} must hold true/false, found {bad[:5]}")
    return text.map(mapping).astype(bool)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path)
    raise ValueError(f"{path}: expected a .csv or .parquet file or a scan output directory")


def _or_nan(value) -> float:
    return np.nan if value is None else float(value)


def aggregate_scan_dir(path: Path) -> pd.DataFrame:
    """One per-model row from a scan output dir (``manifest.json`` + ``summary.parquet``).

    coupling_normalized / coupling_raw = −mean over prompts of depth_mis_coupling_mean /
    depth_mis_coupling_raw_mean (NaN prompts skipped); coupling_std is the std over
    prompts of the normalized per-prompt value.
    """
    manifest_path, summary_path = path / "manifest.json", path / "summary.parquet"
    for p in (manifest_path, summary_path):
        if not p.exists():
            raise ValueError(f"{path}: missing {p.name}; pass a scan output dir, a dir with "
                             "models.parquet, or a per-model .csv/.parquet")
    info = json.loads(manifest_path.read_text()).get("model")
    if not isinstance(info, dict) or not info.get("id"):
        raise ValueError(f"{manifest_path}: needs a 'model' object with an 'id'")
    summary = pd.read_parquet(summary_path)

    def col_mean(name: str, sign: float = 1.0) -> float:
        return sign * float(summary[name].mean()) if name in summary.columns else np.nan

    n_params = info.get("n_params")
    row = {
        "model": str(info["id"]), "revision": info.get("revision"),
        "random_init": bool(info.get("random_init", False)),
        "params_b": _or_nan(n_params) / 1e9,
        "layers": _or_nan(info.get("n_layers")), "d_model": _or_nan(info.get("d_model")),
        "coupling_normalized": col_mean("depth_mis_coupling_mean", -1.0),
        "coupling_std": (float(summary["depth_mis_coupling_mean"].std())
                         if "depth_mis_coupling_mean" in summary.columns else np.nan),
        "coupling_raw": col_mean("depth_mis_coupling_raw_mean", -1.0),
        "lss": col_mean("lss"), "expodistance": col_mean("expodistance"),
        "n_prompts": int(summary["depth_mis_coupling_mean"].notna().sum())
        if "depth_mis_coupling_mean" in summary.columns else 0,
        "source": str(path),
    }
    return pd.DataFrame([row])


# models.parquet / per-model file column -> joined-table column
_MODEL_TABLE_RENAMES = {"coupling_mean": "coupling_normalized",
                        "coupling_raw_mean": "coupling_raw", "lss_mean": "lss",
                        "expodistance_mean": "expodistance"}


# models.parquet since #23 holds mis-coupling as summary.parquet signs it (>= 0); the joined
# table's coupling columns are its negation (the sign of the paper's Section 5.4)
_NEGATED = {"mis_coupling_mean": "coupling_normalized",
            "mis_coupling_raw_mean": "coupling_raw"}


def normalize_model_table(df: pd.DataFrame, source: str = "") -> pd.DataFrame:
    """Bring a per-model table (models.parquet or Table-1 layout) to the joined names.

    ``params`` (a parameter count) becomes ``params_b`` (billions) unless ``params_b``
    exists. Coupling columns must be <= 0 (negated mis-coupling).
    """
    if "model" not in df.columns:
        raise ValueError(f"{source or 'per-model table'}: needs a 'model' column; "
                         f"has {', '.join(map(str, df.columns))}")
    out = df.rename(columns=_MODEL_TABLE_RENAMES).copy()
    for src, dst in _NEGATED.items():
        if src in out.columns and dst not in out.columns:
            out[dst] = -pd.to_numeric(out.pop(src), errors="coerce")
    out = out.rename(columns={"mis_coupling_std": "coupling_std"})
    if "params" in out.columns and "params_b" not in out.columns:
        out["params_b"] = pd.to_numeric(out["params"], errors="coerce") / 1e9
    out = out.drop(columns=[c for c in ("params",) if c in out.columns])
    for col in ("coupling_normalized", "coupling_raw"):
        if col in out.columns and (pd.to_numeric(out[col], errors="coerce") > 0).any():
            raise ValueError(f"{source}: {col} has positive values, but coupling is negative "
                             "mis-coupling (<= 0); the file seems to hold mis-coupling: negate it")
    out["model"] = out["model"].astype(str)
    if "random_init" in out.columns:
        out["random_init"] = _as_bool(out["random_init"])
    out["source"] = source
    return out


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Per-model rows from scan dirs, dirs with models.parquet, or per-model .csv/.parquet."""
    frames = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"results path {path} does not exist")
        if path.is_dir() and (path / "models.parquet").exists():
            frames.append(normalize_model_table(pd.read_parquet(path / "models.parquet"),
                                                str(path / "models.parquet")))
        elif path.is_dir():
            frames.append(aggregate_scan_dir(path))
        else:
            frames.append(normalize_model_table(_read_table(path), str(path)))
    if not frames:
        raise ValueError("no results given")
    table = pd.concat(frames, ignore_index=True)
    if "random_init" not in table.columns:
        table["random_init"] = False
    table["random_init"] = table["random_init"].fillna(False).astype(bool)
    return table


def select_coupling(table: pd.DataFrame, metric: str = "raw") -> pd.DataFrame:
    """Set ``coupling`` to ``coupling_raw`` or ``coupling_normalized`` (when present)."""
    if metric not in ("raw", "normalized"):
        raise ValueError(f"coupling metric must be 'raw' or 'normalized', got {metric!r}")
    out = table.copy()
    source = f"coupling_{metric}"
    if source in out.columns:
        out["coupling"] = pd.to_numeric(out[source], errors="coerce")
    return out


def load_scores(path: str | Path, id_column: str = "model") -> pd.DataFrame:
    """Score table (CSV or parquet) with a unique id column."""
    scores = _read_table(Path(path))
    if id_column not in scores.columns:
        raise ValueError(f"{path}: id column {id_column!r} not found (use --id-column); "
                         f"columns available: {', '.join(map(str, scores.columns))}")
    scores[id_column] = scores[id_column].astype(str)
    dup = scores[id_column][scores[id_column].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{path}: ids repeated in {id_column!r}: {dup[:5]}; make them unique")
    if "fine_tuned" in scores.columns:
        scores["fine_tuned"] = _as_bool(scores["fine_tuned"])
    return scores


@dataclass
class JoinReport:
    """Who matched: result ids without scores, score ids without results."""

    matched: list[str]
    unmatched_results: list[str]
    unmatched_scores: list[str]
    skipped_random_init: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"joined {len(self.matched)} model(s) with scores"]
        if self.unmatched_results:
            lines.append(f"  results without a score row ({len(self.unmatched_results)}): "
                         + ", ".join(self.unmatched_results))
        if self.unmatched_scores:
            lines.append(f"  score rows without results: {len(self.unmatched_scores)}")
        if self.skipped_random_init:
            lines.append("  skipped random-init results (a benchmark score belongs to the "
                         "trained weights): " + ", ".join(self.skipped_random_init))
        return "\n".join(lines)


def _id_as_model(scores: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Rename the id column to ``model`` (an existing ``model`` becomes ``model_scores``)."""
    if id_column == "model":
        return scores
    return scores.rename(columns={"model": "model_scores"}).rename(columns={id_column: "model"})


def join_scores(results: pd.DataFrame, scores: pd.DataFrame,
                id_column: str = "model") -> tuple[pd.DataFrame, JoinReport]:
    """Inner join of per-model results with scores on exact id (results.model == id).

    Random-init rows are dropped. On overlapping columns the scan's value wins for the
    measured columns (``MEASURED``) and the score table's value for the rest (its
    hyper-parameters are the published nominal ones, e.g. 7 B rather than 6.74 B); the
    other side fills gaps. Zero matches -> ValueError listing both id sets.
    """
    trained = results[~results["random_init"]]
    keys, ours = scores[id_column].tolist(), trained["model"].tolist()
    report = JoinReport(matched=[m for m in ours if m in set(keys)],
                        unmatched_results=[m for m in ours if m not in set(keys)],
                        unmatched_scores=[k for k in keys if k not in set(ours)],
                        skipped_random_init=sorted(results.loc[results["random_init"], "model"]))
    if not report.matched:
        raise ValueError(
            "no result model id matches a score id (exact match on "
            f"{id_column!r}); result ids: {sorted(set(ours))[:10]}; "
            f"score ids (first 10): {keys[:10]}; fix the ids or pick --id-column")
    right = _id_as_model(scores, id_column)
    joined = trained.merge(right, on="model", how="inner", suffixes=("", "__scores"))
    for col in [c[: -len("__scores")] for c in joined.columns if c.endswith("__scores")]:
        ours, theirs = joined[col], joined[col + "__scores"]
        joined[col] = ours.combine_first(theirs) if col in MEASURED else theirs.combine_first(ours)
        joined = joined.drop(columns=col + "__scores")
    return joined.reset_index(drop=True), report


def apply_subset(table: pd.DataFrame, expr: str | None = None,
                 base_only: bool = False) -> pd.DataFrame:
    """Rows matching a ``DataFrame.query`` expression and/or ``fine_tuned == False``."""
    out = table
    if base_only:
        if "fine_tuned" not in out.columns:
            raise ValueError("--base-only needs a 'fine_tuned' column (e.g. from the paper "
                             f"table); columns available: {', '.join(map(str, out.columns))}")
        out = out[~_as_bool(out["fine_tuned"])]
    if expr:
        try:
            out = out.query(expr)
        except Exception as exc:  # query raises many types (SyntaxError, UndefinedVariable…)
            raise ValueError(f"bad --subset {expr!r}: {first_line(exc)}; columns available: "
                             f"{', '.join(map(str, table.columns))}") from None
        if not isinstance(out, pd.DataFrame) or len(out) == 0:
            raise ValueError(f"--subset {expr!r} selects no rows (of {len(table)})")
    return out.reset_index(drop=True)
