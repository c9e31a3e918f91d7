"""Scan every checkpoint of one training run: coupling and regularity against training step.

The spec (YAML file or dict) and its entries are in :mod:`coupling.experiments.checkpoint_spec`;
this module loads each checkpoint, scans it, and
summarises the series.

Output of ``scan_checkpoints(spec, out_dir)``::

    out_dir/step-<N>/        one scan directory per checkpoint (layout: coupling.results.scan_output)
    out_dir/ref-<name>/      one per reference
    out_dir/dynamics.parquet one row per scan: step, mean m~, mean raw m, LSS, ED, losses
    out_dir/figures/         coupling_vs_step.png, lss_vs_step.png, adjacency_step<N>.png

Finished scans are kept on a rerun (a scan directory is either complete or absent), so an
interrupted series resumes where it stopped; a finished directory made from another
checkpoint or with other settings is an error (``overwrite=True`` rescans it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from coupling.experiments.checkpoint_spec import Checkpoint, parse_spec
from coupling.model.loading import LoadedModel, load_model
from coupling.results.owned import atomic_write
from coupling.results.scan_output import MANIFEST, read_scan_output
from coupling.scan import SETTINGS_KEYS, ScanConfig, scan
from coupling.settings.schema import CHECKPOINT_SCAN_FLAGS

__all__ = ["PER_ENTRY", "REUSE_KEYS", "DYNAMICS", "load_checkpoint", "training_state",
           "series_config", "scan_checkpoints", "dynamics_table", "cmd_checkpoints",
           "format_dynamics"]

# settings that a checkpoint entry decides; they cannot be given for the whole series
PER_ENTRY = {"model", "revision", "random_init", "init_seed", "out", "overwrite"}
# scan settings that must match for a finished scan directory to be reused
REUSE_KEYS = ("prompts", "max_prompts", "prompt_seed", "max_tokens", "dtype", "block_path",
              *sorted(SETTINGS_KEYS))
DYNAMICS = "dynamics.parquet"


# ------------------------------------------------------------------------------------------
# Loading one checkpoint
# ------------------------------------------------------------------------------------------
def load_checkpoint(ckpt: Checkpoint, series: str, dtype="float32",
                    trust_remote_code: bool = False) -> LoadedModel:
    """Load ``ckpt`` and label it as series ``series`` at revision ``ckpt.label``."""
    if ckpt.kind == "zero":
        from coupling.model.zero import load_zero_checkpoint
        lm = load_zero_checkpoint(ckpt.source, ckpt.config, ckpt.tag, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    else:
        lm = load_model(ckpt.source, revision=ckpt.revision, dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        random_init=ckpt.kind == "random_init", seed=ckpt.seed)
    # same model, another revision: what the hub calls it, and what the reports group by
    lm.info.update(id=series, revision=None if ckpt.kind == "random_init" else ckpt.label,
                   checkpoint=ckpt.identity())
    lm.info.setdefault("path", ckpt.source)
    return lm


def training_state(ckpt: Checkpoint) -> dict:
    """``loss`` / ``eval_loss`` from a folder's ``trainer_state.json`` (ours, or a HF
    Trainer's ``log_history``), NaN when absent."""
    out = {"loss": np.nan, "eval_loss": np.nan}
    path = Path(ckpt.source, "trainer_state.json")
    if ckpt.kind != "path" or not path.is_file():
        return out
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return out
    for key in out:
        if isinstance(state.get(key), (int, float)):
            out[key] = float(state[key])
        else:
            hist = [h[key] for h in state.get("log_history", []) if isinstance(h, dict) and key in h]
            if hist:
                out[key] = float(hist[-1])
    return out


# ------------------------------------------------------------------------------------------
# Scanning the series
# ------------------------------------------------------------------------------------------
def _normalise(value):
    return json.loads(json.dumps(value, default=str))


def _check_reusable(folder: Path, ckpt: Checkpoint, config: ScanConfig) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    old_id = manifest.get("model", {}).get("checkpoint")
    if old_id != _normalise(ckpt.identity()):
        raise ValueError(f"{folder} holds a finished scan of another checkpoint ({old_id}): "
                         "use another --out, or --overwrite to rescan")
    new = config.to_dict()
    old = manifest.get("config", {})
    diff = [k for k in REUSE_KEYS if _normalise(old.get(k)) != _normalise(new.get(k))]
    if diff:
        raise ValueError(f"{folder} was scanned with other settings ({', '.join(diff)}): "
                         "use another --out, or --overwrite to rescan")


def series_config(settings: dict) -> dict:
    """Scan settings shared by every checkpoint; per-checkpoint keys are refused."""
    bad = sorted(set(settings) & PER_ENTRY)
    if bad:
        raise ValueError(f"scan setting(s) {bad} are decided per checkpoint by the spec: "
                         "remove them from `scan:` / the keyword arguments")
    settings = {"figures": False, **settings}
    ScanConfig.from_dict(settings)            # unknown keys / bad values fail here, early
    return settings


def _log(msg: str, progress: bool):
    if progress:
        print(msg, file=sys.stderr, flush=True)


def scan_checkpoints(spec, out_dir, *, progress: bool = True, overwrite: bool = False,
                     training_figures: bool = True, adjacency_steps=None,
                     **scan_kw) -> pd.DataFrame:
    """Scan every checkpoint of ``spec`` into ``out_dir/step-<N>/`` and summarise.

    ``scan_kw``: ``ScanConfig``/``ScanSettings`` keys (``prompts``, ``max_prompts``, ``k``,
    ...; they override the spec's ``scan:``).  Per-checkpoint figures are off unless
    ``figures=True``; the training figures (``draw_training_figures``) go to
    ``out_dir/figures/``.  Returns the dynamics table (also written to
    ``out_dir/dynamics.parquet``): one row per checkpoint (by step), then the references.
    """
    series, entries, spec_settings = parse_spec(spec)
    settings = series_config({**spec_settings, **scan_kw})
    steps = [e.step for e in entries if e.role == "checkpoint"]
    if adjacency_steps is not None:
        missing = sorted(set(int(s) for s in adjacency_steps) - set(steps))
        if missing:
            raise ValueError(f"adjacency step(s) {missing} are not checkpoints of the spec: "
                             f"choose from {steps}")
    out = Path(out_dir)
    if out.is_file():
        raise ValueError(f"--out {out} is a file: pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    for i, ckpt in enumerate(entries, 1):
        folder = out / ckpt.dirname
        config = ScanConfig.from_dict({**settings, "out": str(folder), "overwrite": overwrite,
                                       "model": ckpt.source, "revision": ckpt.revision,
                                       "random_init": ckpt.kind == "random_init",
                                       "init_seed": ckpt.seed})
        head = f"[{i}/{len(entries)}] {ckpt.dirname} ({ckpt.kind} {ckpt.source})"
        if (folder / MANIFEST).exists() and not overwrite:
            _check_reusable(folder, ckpt, config)
            _log(f"{head}: finished earlier, kept", progress)
            continue
        _log(f"{head}: scanning", progress)
        lm = load_checkpoint(ckpt, series, config.dtype, config.trust_remote_code)
        scan(config=config, loaded=lm, progress=progress)
    table = dynamics_table(out, entries)
    atomic_write(out / DYNAMICS, table.to_parquet(index=False))
    runs = [(e.step, out / e.dirname) for e in entries if e.role == "checkpoint"]
    if training_figures and runs:
        from coupling.figures.training import draw_training_figures
        draw_training_figures(runs, out / "figures", adjacency_steps=adjacency_steps)
    return table


def dynamics_table(out_dir, entries: list[Checkpoint]) -> pd.DataFrame:
    """One row per scanned entry: prompt means of m~ (and its std), raw m, LSS, ED."""
    rows = []
    for e in entries:
        res = read_scan_output(Path(out_dir) / e.dirname)
        s = res.summary
        mean = lambda c: float(s[c].mean()) if c in s else np.nan  # noqa: E731
        rows.append({"step": e.step if e.role == "checkpoint" else None, "label": e.label,
                     "role": e.role, "kind": e.kind, "n_prompts": len(s),
                     "mis_coupling": mean("depth_mis_coupling_mean"),
                     "mis_coupling_std": float(s["depth_mis_coupling_mean"].std())
                     if "depth_mis_coupling_mean" in s else np.nan,
                     "mis_coupling_raw": mean("depth_mis_coupling_raw_mean"),
                     "lss": mean("lss"), "expodistance": mean("expodistance"),
                     **training_state(e), "scan_dir": e.dirname})
    df = pd.DataFrame(rows)
    df["step"] = df["step"].astype("Int64")
    return df


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def cmd_checkpoints(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in CHECKPOINT_SCAN_FLAGS
          if getattr(args, k) is not None}
    if args.step_figures:
        kw["figures"] = True
    steps = None
    if args.adjacency_steps:
        try:
            steps = [int(s) for s in args.adjacency_steps.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--adjacency-steps {args.adjacency_steps!r}: give a comma list "
                             "of integers, e.g. 0,64,1600") from None
    table = scan_checkpoints(args.spec, args.out, progress=not args.quiet,
                             overwrite=args.overwrite, adjacency_steps=steps, **kw)
    print(format_dynamics(table))
    print(f"results in {args.out} ({DYNAMICS}, figures/)")
    return 0


def format_dynamics(table: pd.DataFrame) -> str:
    """The dynamics table as aligned text (m~ and LSS per step)."""
    cols = ["step", "label", "n_prompts", "mis_coupling", "mis_coupling_std",
            "mis_coupling_raw", "lss", "expodistance", "eval_loss"]
    view = table[[c for c in cols if c in table]].copy()
    return view.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
