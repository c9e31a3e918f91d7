"""The study pipeline: data -> train the LM suite -> scan every checkpoint -> one tidy table
-> ViT grid -> pruning -> analyses.

Every phase resumes: a trained run has ``training.json``, a scanned checkpoint its scan
folder, a ViT its ``result.json``; rerunning the same command computes only what is missing.
Scanning is done by a ``scanner`` the caller passes (the Ray scanner of
``ray_jobs.study``, replicas over models, or :class:`LocalScanner`), so this module never
imports Ray.

Layout of ``OUT``::

    data/                       token streams, multiple-choice set, tokenizer (npz + JSON)
    lm/<run>/checkpoints/step-<N>/, training.json      every LM and its checkpoints
    scans/<variant>/<key>/      one scan output per checkpoint (the local scan's layout)
    vit/<run>/result.json       every ViT (weights in vit/<run>/model/)
    tables/lm.csv, vit.csv, pruning.csv, pruning_single.csv      the tidy tables
    analyses/                   figures, tables and analyses.md (coupling.experiments.study.analyses)
    study.json                  the spec, versions, timings
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from coupling.experiments.study.config import StudySpec
from coupling.results.owned import atomic_write

PHASES = ("train", "scan", "vit", "prune", "analyses")
SCAN_DEFAULTS = {"prompts": "builtin", "max_prompts": 24, "max_tokens": 64, "k": 10,
                 "measures": "depth,regularity", "figures": False}


def run_study(spec: StudySpec, out, scanner, *, device: str = "cpu", threads: int | None = None,
              phases=PHASES, log=print) -> dict:
    """Run the phases of ``spec`` into ``out``; returns the tidy tables by name."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()     # a bar per checkpoint saved or loaded is noise
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = sorted(set(phases) - set(PHASES))
    if bad:
        raise ValueError(f"unknown phase(s) {bad}: choose from {', '.join(PHASES)}")
    timings, tables = {}, {}
    t0 = time.perf_counter()
    data = None
    if {"train", "prune"} & set(phases):
        data = study_data(spec, out, log)
    if "train" in phases:
        train_suite(spec, out, data, device, threads, log)
    timings["train_s"] = time.perf_counter() - t0
    if "scan" in phases:
        t = time.perf_counter()
        scan_suite(spec, out, scanner, log)
        timings["scan_s"] = time.perf_counter() - t
    tables["lm"] = lm_table(spec, out)
    if "vit" in phases and spec.vit_runs:
        t = time.perf_counter()
        tables["vit"] = vit_suite(spec, out, device, threads, log)
        timings["vit_s"] = time.perf_counter() - t
    elif (out / "tables" / "vit.csv").is_file():
        tables["vit"] = pd.read_csv(out / "tables" / "vit.csv")
    if "prune" in phases:
        t = time.perf_counter()
        tables["pruning"], tables["pruning_single"] = prune_suite(spec, out, data, tables["lm"],
                                                                  device, log)
        timings["prune_s"] = time.perf_counter() - t
    for name, df in tables.items():
        write_csv(df, out / "tables" / f"{name}.csv")
    if "analyses" in phases:
        from coupling.experiments.study.analyses import write_analyses
        loaded = {n: pd.read_csv(p) for n, p in _table_files(out).items()}
        write_analyses(loaded, out / "analyses")
    timings["total_s"] = time.perf_counter() - t0
    _write_record(spec, out, timings, device)
    log(f"study done in {timings['total_s']:.0f} s: tables in {out / 'tables'}, analyses in "
        f"{out / 'analyses'}")
    return tables


# ------------------------------------------------------------------------------------------
# Data and training
# ------------------------------------------------------------------------------------------
def study_data(spec: StudySpec, out: Path, log):
    """The corpus streams and the multiple-choice set, built once and kept in ``out/data``."""
    from coupling.experiments.study import lm_data

    folder = out / "data"
    if (folder / "description.json").is_file():
        return lm_data.load_lm_data(folder)
    d = spec.data
    t = time.perf_counter()
    data = lm_data.prepare_lm_data(_tokenizer_dir(d.get("tokenizer", "embedded:tiny")),
                                   max_chars=d.get("max_chars", 8_000_000),
                                   seed=d.get("corpus_seed", 0),
                                   mc_items=d.get("mc_items", 200),
                                   **{k: d[k] for k in ("mc_context", "mc_continuation",
                                                        "mc_choices") if k in d})
    lm_data.save_lm_data(data, folder)
    log(f"data: {len(data.train_ids):,} train tokens, {len(data.heldout_ids):,} held-out "
        f"tokens, {len(data.mc.answer)} multiple-choice items ({time.perf_counter() - t:.0f} s)")
    return data


def _tokenizer_dir(name: str) -> Path:
    if str(name).startswith("embedded:"):
        from coupling.model.loading import TINY_MODEL_DIR
        return Path(TINY_MODEL_DIR)
    return Path(name)


def train_suite(spec: StudySpec, out: Path, data, device, threads, log):
    from coupling.experiments.study.lm import LMSpec, train_lm

    eval_windows = spec.data.get("eval_windows")
    for i, run in enumerate(spec.lm_runs, 1):
        folder = out / "lm" / run.name
        if (folder / "training.json").is_file():
            log(f"[{i}/{len(spec.lm_runs)}] {run.name}: trained already")
            continue
        log(f"[{i}/{len(spec.lm_runs)}] training {run.name} ({run.factor})")
        kwargs = dict(run.spec)
        if eval_windows is not None:
            kwargs.setdefault("eval_windows", eval_windows)
        train_lm(LMSpec(**kwargs), data, folder, device=device, threads=threads, log=log)


def checkpoints(out: Path, run_name: str) -> list[tuple[int, Path]]:
    """(step, folder) of a trained run's checkpoints, by step."""
    found = []
    for p in (out / "lm" / run_name / "checkpoints").glob("step-*"):
        if (p / "trainer_state.json").is_file():
            found.append((int(p.name.split("-")[1]), p))
    return sorted(found)


# ------------------------------------------------------------------------------------------
# Scans
# ------------------------------------------------------------------------------------------
def scan_items(spec: StudySpec, out: Path, variant: str = "main") -> list[tuple[str, Path]]:
    """(``<run>@<step>``, checkpoint folder) of every trained checkpoint the variant scans."""
    items = []
    for run in spec.lm_runs:
        if not variant_scans(spec, variant, run):
            continue
        for step, folder in checkpoints(out, run.name):
            items.append((f"{run.name}@{step}", folder))
    return items


def scan_settings(spec: StudySpec, variant: str) -> dict:
    keys = ("prompts", "max_prompts", "max_tokens", "k", "shard_size", "replicas")
    settings = {**SCAN_DEFAULTS, **{k: spec.scan[k] for k in keys if k in spec.scan}}
    settings.update({k: v for k, v in spec.variants[variant].items() if k != "factors"})
    return settings


def variant_scans(spec: StudySpec, variant: str, run) -> bool:
    """Whether ``variant`` scans ``run`` (its ``factors`` list; all runs when absent)."""
    factors = spec.variants[variant].get("factors")
    return factors is None or run.factor in factors


def scan_suite(spec: StudySpec, out: Path, scanner, log):
    if not scan_items(spec, out):
        raise ValueError(f"no trained checkpoints under {out / 'lm'}: run the 'train' phase first")
    index = {}
    for variant in spec.variants:
        items = scan_items(spec, out, variant)
        log(f"scanning {len(items)} checkpoints, variant {variant} "
            f"({scan_settings(spec, variant)})")
        folders = scanner(items, scan_settings(spec, variant), out / "scans" / variant)
        index[variant] = {ident: str(Path(f).relative_to(out)) for ident, f in folders.items()}
    atomic_write(out / "scans" / "index.json", json.dumps(index, indent=1).encode())


class LocalScanner:
    """Scans checkpoints one after the other with the local scan (no Ray); a folder that
    holds a finished scan is kept."""

    def __init__(self, threads: int | None = None, log=print):
        self.threads, self.log = threads, log

    def __call__(self, items, settings: dict, out_dir: Path) -> dict:
        from coupling.scan import ScanConfig, scan
        from coupling.settings.schema import names

        settings = {k: v for k, v in settings.items() if k in names("scan", "analysis")}
        folders = {}
        for ident, path in items:
            folder = Path(out_dir) / ident.replace("@", "_step")
            if not (folder / "summary.parquet").is_file():
                cfg = ScanConfig.from_dict({**settings, "model": str(path), "out": str(folder),
                                            "threads": self.threads})
                scan(config=cfg, progress=False)
            folders[ident] = folder
        return folders


# ------------------------------------------------------------------------------------------
# The tidy LM table
# ------------------------------------------------------------------------------------------
SUMMARY_MEANS = {"mis_coupling_raw": "depth_mis_coupling_raw_mean", "lss": "lss",
                 "expodistance": "expodistance", "equidistance_cv": "equidistance_cv",
                 "undetermined_layers": "depth_undetermined_layers"}


def lm_table(spec: StudySpec, out: Path) -> pd.DataFrame:
    """One row per model x checkpoint step x scan variant (scan columns NaN when unscanned)."""
    index = _scan_index(out)
    rows = []
    for run in spec.lm_runs:
        train_file = out / "lm" / run.name / "training.json"
        if not train_file.is_file():
            continue
        training = json.loads(train_file.read_text())
        model = _model_columns(run, training)
        for step, folder in checkpoints(out, run.name):
            state = json.loads((folder / "trainer_state.json").read_text())
            base = {**model, "step": step, "final": step == model["total_steps"],
                    **{k: state.get(k) for k in ("tokens_seen", "eval_loss", "eval_acc",
                                                 "mc_acc")},
                    "train_loss": state.get("loss")}
            for variant in spec.variants:
                if not variant_scans(spec, variant, run):
                    continue
                settings = scan_settings(spec, variant)
                row = {**base, "scan": variant, "k": settings["k"],
                       "last_block": settings.get("last_block", "with-final-norm")}
                scan_dir = index.get(variant, {}).get(f"{run.name}@{step}")
                if scan_dir:
                    row.update(scan_columns(out / scan_dir))
                rows.append(row)
    return pd.DataFrame(rows)


def _model_columns(run, training: dict) -> dict:
    s = training["spec"]
    return {"model": run.name, "factor": run.factor, "seed": s["seed"],
            "n_layer": s["n_layer"], "n_embd": s["n_embd"], "n_head": s["n_head"],
            "total_steps": s["steps"], "weight_decay": s["weight_decay"],
            "dropout": s["dropout"], "params": training["parameters"],
            "params_nonembed": training["non_embedding_parameters"]}


def scan_columns(folder: Path) -> dict:
    """Means over prompts of one scan folder's summary."""
    s = pd.read_parquet(folder / "summary.parquet")
    mis = s["depth_mis_coupling_mean"]
    row = {"mis_coupling": float(mis.mean()), "mis_coupling_std": float(mis.std()),
           "coupling": 1.0 - float(mis.mean()), "n_prompts": len(s)}
    for col, src in SUMMARY_MEANS.items():
        row[col] = float(s[src].mean()) if src in s else np.nan
    return row


def _scan_index(out: Path) -> dict:
    path = out / "scans" / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def mean_depth_matrix(folder: Path) -> np.ndarray:
    """The (L, L) normalized mis-coupling matrix of a scan, mean over prompts."""
    with np.load(folder / "depth_coupling.npz", allow_pickle=False) as z:
        return np.nanmean(z["normalized"], axis=0)


# ------------------------------------------------------------------------------------------
# ViT grid and pruning
# ------------------------------------------------------------------------------------------
def vit_suite(spec: StudySpec, out: Path, device, threads, log) -> pd.DataFrame:
    from coupling.experiments.study.vit import ViTSpec, load_digits_split, run_vit

    data = load_digits_split(seed=0)
    rows = []
    for i, run in enumerate(spec.vit_runs, 1):
        folder = out / "vit" / run["name"]
        if (folder / "result.json").is_file():
            rows.append(json.loads((folder / "result.json").read_text())["row"])
            continue
        log(f"[vit {i}/{len(spec.vit_runs)}] {run['name']}")
        # one thread: a ViT step on 8x8 digits is too small to gain from more (vit.py)
        rows.append(run_vit(ViTSpec(**run), data, folder, k=spec.vit.get("k", 10),
                            n_images=spec.vit.get("n_images", 16), device=device,
                            threads=1 if device == "cpu" else threads, log=log))
    return pd.DataFrame(rows)


def pruning_models(spec: StudySpec, table: pd.DataFrame) -> list[str]:
    models = spec.pruning.get("models", "largest")
    if models != "largest":
        return list(models)
    final = table[table["final"]].drop_duplicates("model")
    if final.empty:
        return []
    # the largest by parameters and the deepest: block pruning needs depth to be interesting
    picks = [final.loc[final["params"].idxmax(), "model"],
             final.loc[final["n_layer"].idxmax(), "model"]]
    return list(dict.fromkeys(picks))


def prune_suite(spec: StudySpec, out: Path, data, table: pd.DataFrame, device, log):
    from coupling.experiments.study import pruning
    from coupling.experiments.study.lm_eval import heldout_metrics
    from coupling.model.loading import load_model

    curves, singles = [], []
    index = _scan_index(out).get("main", {})
    windows = spec.data.get("eval_windows")
    for name in pruning_models(spec, table):
        run = spec.lm_run(name)
        steps = checkpoints(out, name)
        step, folder = steps[-1]
        scan_dir = index.get(f"{name}@{step}")
        if scan_dir is None:
            log(f"pruning {name}: its final checkpoint is not scanned; skipped")
            continue
        model = load_model(str(folder), device=device).model.eval()
        seq_len = run.spec.get("seq_len", 64)

        def eval_fn(m, seq_len=seq_len):
            return heldout_metrics(m, data.heldout_ids, seq_len, max_windows=windows)["eval_loss"]

        nb = pruning.neighbour_coupling(mean_depth_matrix(out / scan_dir))
        probe = pruning_windows(data.heldout_ids, seq_len)
        ang = pruning.angular_distance(model, probe)
        orders = pruning.pruning_orders(nb, ang, n_random=spec.pruning.get("n_random", 5))
        max_removed = min(spec.pruning.get("max_removed", 4), len(nb) - 1)
        log(f"pruning {name}: {len(nb)} blocks, orders {', '.join(orders)}, up to "
            f"{max_removed} removed")
        single = pd.DataFrame({"model": name, "block": np.arange(len(nb)),
                               "loss_increase": pruning.single_block_losses(model, eval_fn)
                               - eval_fn(model),
                               "neighbour_coupling": nb, "angular_distance": ang})
        curve = pruning.pruning_curves(model, orders, eval_fn, max_removed)
        curve.insert(0, "model", name)
        singles.append(single)
        curves.append(curve)
    return (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
            pd.concat(singles, ignore_index=True) if singles else pd.DataFrame())


def pruning_windows(stream, seq_len: int, n: int = 16):
    """``n`` evenly spaced held-out windows (n, seq_len) for the angular-distance baseline."""
    import torch

    starts = np.linspace(0, len(stream) - seq_len - 1, n).astype(int)
    return torch.stack([stream[s:s + seq_len] for s in starts])


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------
def write_csv(df: pd.DataFrame, path: Path):
    atomic_write(path, df.to_csv(index=False).encode())


def _table_files(out: Path) -> dict:
    return {p.stem: p for p in sorted((out / "tables").glob("*.csv")) if p.stat().st_size > 1}


def _write_record(spec: StudySpec, out: Path, timings: dict, device: str):
    import torch
    import transformers

    record = {"name": spec.name, "spec": spec.raw, "device": device, "timings": timings,
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "command": " ".join(sys.argv)}
    atomic_write(out / "study.json", (json.dumps(record, indent=2, default=str) + "\n").encode())
