"""Reducer: finished shards -> the local scan's output folder per model + ``models.parquet``.

Per (model, revision) the prompts' ``PromptResult`` objects are written by the library's own
``coupling.results.scan_output.write_scan_output`` into ``OUT/<model-key>/`` (identical layout to
``coupling scan``), so ``coupling report`` / ``coupling correlate`` read it unchanged.

``OUT/models.parquet`` has one row per (model, revision), the quantities named and signed as
in ``summary.parquet`` (docs/methods.md, "Names and signs"): ``mis_coupling_mean`` = the
mean over prompts of ``depth_mis_coupling_mean`` (normalized m~, Eq. 14; NaN skipped),
``mis_coupling_std`` its std (ddof=1), ``mis_coupling_raw_mean`` the mean of
``depth_mis_coupling_raw_mean`` (raw m, Eq. 13).  Tables written before #23 held the negated
values as ``coupling_mean`` / ``coupling_raw_mean``; ``coupling correlate`` reads both.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from coupling.results.owned import atomic_write
from coupling.results.scan_output import write_scan_output
from coupling.scan import build_manifest

MODEL_COLUMNS = ("model", "revision", "params", "layers", "d_model", "mis_coupling_mean",
                 "mis_coupling_std", "mis_coupling_raw_mean", "lss_mean", "expodistance_mean",
                 "n_prompts")


def write_model_output(folder, job, info: dict, results, timings: dict, ray_info: dict,
                       failures=()) -> Path:
    """``OUT/<key>/`` via ``write_scan_output`` (atomic), manifest extended with ``ray``;
    ``failures`` (a ``failure_record`` per failed prompt) go to its ``failures.json``."""
    manifest = build_manifest(job.scan, info, timings, results)
    manifest["ray"] = ray_info
    manifest["prompts"] = {"total": len(results) + len(failures), "failed": len(failures)}
    out = write_scan_output(folder, manifest, results, overwrite=True, failures=failures)
    if job.scan.figures:
        from coupling.figures.report import draw_figures
        draw_figures(out)
    return out


def model_row(job, info: dict, summary: pd.DataFrame) -> dict:
    def mean(col):
        return float(summary[col].mean()) if col in summary else np.nan

    mis = summary["depth_mis_coupling_mean"] if "depth_mis_coupling_mean" in summary else None
    return {"model": str(info["id"]), "revision": job.scan.revision,
            "params": int(info["n_params"]), "layers": int(info["n_layers"]),
            "d_model": int(info["d_model"]),
            "mis_coupling_mean": mean("depth_mis_coupling_mean"),
            "mis_coupling_std": float(mis.std()) if mis is not None else np.nan,
            "mis_coupling_raw_mean": mean("depth_mis_coupling_raw_mean"),
            "lss_mean": mean("lss"), "expodistance_mean": mean("expodistance"),
            "n_prompts": int(len(summary)),
            "random_init": bool(job.scan.random_init), "dtype": info.get("dtype"),
            "key": job.key}


def write_models_table(out_dir, rows) -> Path:
    """``models.parquet`` (atomic): the columns of ``MODEL_COLUMNS`` first, then extras."""
    df = pd.DataFrame(rows)
    df = df[list(MODEL_COLUMNS) + [c for c in df.columns if c not in MODEL_COLUMNS]]
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    path = Path(out_dir) / "models.parquet"
    atomic_write(path, buf.getvalue())
    return path
