"""Scan every checkpoint of one training run: coupling and regularity against training step.

A *spec* (YAML file or dict) names the checkpoints of one model::

    name: tiny                              # label of the series (default: model or file name)
    model: EleutherAI/pythia-160m           # hub id for `revisions`
    revisions: [step1000, step2000]         # hub revisions; step parsed from the name
    checkpoints:                            # any mix of
      - embedded:tiny/checkpoints/step-*    #   a folder glob (step parsed from each name)
      - {path: runs/ckpt-final, step: 5000} #   one save_pretrained folder
      - {revision: step3000, step: 3000}    #   a hub revision (of `model`, or its own `model:`)
      - {zero: ds_out/, config: hf_cfg/, tag: global_step400}   # DeepSpeed ZeRO-2/3
      - {model: embedded:tiny, random_init: true, seed: 0, step: 0}
    references:                             # scanned, but not on the step axis
      - {model: embedded:tiny, random_init: true, name: random-init}
    scan: {max_prompts: 20, k: 10}          # ScanConfig / ScanSettings keys for every scan

``embedded:tiny`` stands for the packaged tiny model's folder; other relative paths are
relative to the working directory.  A step is parsed from ``step<N>`` / ``step-<N>`` /
``global_step<N>`` (else the last number) in a folder name, revision or ZeRO tag, unless the
entry gives ``step:``.

Output of ``scan_checkpoints(spec, out_dir)``::

    out_dir/step-<N>/        one scan directory per checkpoint (layout: coupling.results)
    out_dir/ref-<name>/      one per reference
    out_dir/dynamics.parquet one row per scan: step, mean m~, mean raw m, LSS, ED, losses
    out_dir/figures/         coupling_vs_step.png, lss_vs_step.png, adjacency_step<N>.png

Finished scans are kept on a rerun (a scan directory is either complete or absent), so an
interrupted series resumes where it stopped; a finished directory made from another
checkpoint or with other settings is an error (``overwrite=True`` rescans it).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .loading import TINY_MODEL_DIR, LoadedModel, load_model
from .cli import CHECKPOINT_SCAN_FLAGS
from .owned import atomic_write
from .results import MANIFEST, read_scan_output
from .scan import SETTINGS_KEYS, ScanConfig, scan

EMBEDDED = "embedded:tiny"
SPEC_KEYS = {"name", "model", "revisions", "checkpoints", "references", "scan"}
ENTRY_KEYS = {"path", "revision", "model", "zero", "config", "tag", "random_init", "seed",
              "step", "name"}
# settings that a checkpoint entry decides; they cannot be given for the whole series
PER_ENTRY = {"model", "revision", "random_init", "init_seed", "out", "overwrite"}
# scan settings that must match for a finished scan directory to be reused
REUSE_KEYS = ("prompts", "max_prompts", "prompt_seed", "max_tokens", "dtype", "block_path",
              *sorted(SETTINGS_KEYS))
DYNAMICS = "dynamics.parquet"


# ------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One checkpoint to scan.  ``kind``: path | revision | zero | random_init."""

    kind: str
    source: str                 # folder, hub id, or ZeRO directory
    step: int | None
    label: str                  # "step-512", "step1000", "global_step400", "random-init"
    role: str = "checkpoint"    # checkpoint | reference
    revision: str | None = None
    config: str | None = None   # ZeRO: folder with config.json (+ tokenizer)
    tag: str | None = None      # ZeRO tag
    seed: int = 0               # random_init

    @property
    def dirname(self) -> str:
        return f"step-{self.step}" if self.role == "checkpoint" else f"ref-{self.label}"

    def identity(self) -> dict:
        """What makes two entries the same checkpoint (stored in the scan's manifest)."""
        d = {"kind": self.kind, "source": self.source, "step": self.step, "label": self.label}
        if self.revision:
            d["revision"] = self.revision
        if self.kind == "zero":
            d.update(config=self.config, tag=self.tag)
        if self.kind == "random_init":
            d["seed"] = self.seed
        return d


def parse_step(name: str) -> int | None:
    """Training step in a checkpoint name: ``step-512``, ``step1000``, ``global_step14``,
    ``checkpoint-2000`` -> int; None when the name holds no number."""
    m = re.search(r"step[-_]?(\d+)", name, flags=re.IGNORECASE)
    if m:
        return int(m.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def resolve_path(path: str) -> str:
    """``embedded:tiny[/...]`` -> the packaged tiny model folder; other paths unchanged."""
    p = str(path)
    if p == EMBEDDED or p.startswith(EMBEDDED + "/"):
        return str(TINY_MODEL_DIR / p[len(EMBEDDED):].lstrip("/"))
    return os.path.expanduser(p)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _step_of(entry: dict, name: str, where: str) -> int:
    step = entry.get("step")
    if step is None:
        step = parse_step(name)
        if step is None:
            raise ValueError(f"{where}: cannot read a training step from {name!r}: "
                             "give the entry a `step:`")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{where}: step must be a non-negative integer, got {step!r}")
    return int(step)


def _path_entries(entry: dict, where: str) -> list[Checkpoint]:
    raw = str(entry["path"])
    path = resolve_path(raw)
    if _is_glob(path):
        folders = sorted(p for p in glob.glob(path) if Path(p).is_dir())
        if not folders:
            raise ValueError(f"{where}: no checkpoint folder matches {raw!r} (looked for "
                             f"{path}): check the pattern")
        if "step" in entry:
            raise ValueError(f"{where}: a glob matches several folders; drop `step:` (each "
                             "step is parsed from its folder name)")
    else:
        if not Path(path).is_dir():
            raise ValueError(f"{where}: checkpoint folder {raw!r} does not exist: pass a "
                             "save_pretrained folder")
        folders = [path]
    return [Checkpoint("path", f, _step_of(entry, Path(f).name, where), Path(f).name)
            for f in folders]


def _zero_entry(entry: dict, where: str) -> Checkpoint:
    from .zero import resolve_tag

    if not entry.get("config"):
        raise ValueError(f"{where}: a ZeRO entry needs `config:` (a folder with the model's "
                         "config.json and tokenizer)")
    zero_dir, config = resolve_path(entry["zero"]), resolve_path(entry["config"])
    if not Path(config, "config.json").is_file():
        raise ValueError(f"{where}: {entry['config']!r} holds no config.json: pass the "
                         "model's save_pretrained or config folder")
    tag = resolve_tag(zero_dir, entry.get("tag"))
    return Checkpoint("zero", zero_dir, _step_of(entry, tag, where), tag, config=config, tag=tag)


def _one_entry(entry, default_model: str | None, where: str) -> list[Checkpoint]:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping such as {{path: DIR, step: N}}, "
                         f"got {entry!r}")
    bad = sorted(set(entry) - ENTRY_KEYS)
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}: valid keys are "
                         f"{', '.join(sorted(ENTRY_KEYS))}")
    kinds = [k for k in ("path", "revision", "zero") if k in entry]
    if entry.get("random_init"):
        kinds.append("random_init")
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of path, revision, zero or "
                         f"random_init: true (got {kinds or 'none'})")
    kind = kinds[0]
    if kind == "path":
        return _path_entries(entry, where)
    if kind == "zero":
        return [_zero_entry(entry, where)]
    model = entry.get("model") or default_model
    if not model:
        raise ValueError(f"{where}: no model for this {kind} entry: set `model:` in the "
                         "entry or at the top of the spec")
    model = resolve_path(model)
    if kind == "revision":
        rev = str(entry["revision"])
        return [Checkpoint("revision", model, _step_of(entry, rev, where), rev, revision=rev)]
    seed = int(entry.get("seed", 0))
    step = entry.get("step", 0)
    return [Checkpoint("random_init", model, _step_of({"step": step}, "", where),
                       "random-init" if seed == 0 else f"random-init-seed{seed}", seed=seed)]


def load_spec(spec) -> dict:
    """A spec mapping from a dict, or a YAML file path (its stem is the default name)."""
    if isinstance(spec, dict):
        return dict(spec)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"checkpoint spec {p} not found: pass a YAML file (see "
                         "configs/checkpoints_tiny.yaml)")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint spec {p} must hold a mapping (keys: "
                         f"{', '.join(sorted(SPEC_KEYS))})")
    data.setdefault("name", p.stem.removeprefix("checkpoints_").removeprefix("checkpoints-"))
    return data


def parse_spec(spec) -> tuple[str, list[Checkpoint], dict]:
    """``(series name, checkpoints sorted by step then references, scan settings)``.

    Validates everything that can be checked without loading a model: keys, paths, globs,
    ZeRO tags, unique steps and reference names.
    """
    data = load_spec(spec)
    bad = sorted(set(data) - SPEC_KEYS)
    if bad:
        raise ValueError(f"unknown spec key(s) {bad}: valid keys are {', '.join(sorted(SPEC_KEYS))}")
    model = data.get("model")
    entries: list[Checkpoint] = []
    revisions = data.get("revisions") or []
    if revisions and not model:
        raise ValueError("`revisions` needs `model:` (the hub id they belong to)")
    for i, rev in enumerate(revisions):
        item = rev if isinstance(rev, dict) else {"revision": rev}
        entries += _one_entry(item, model, f"revisions[{i}]")
    for i, item in enumerate(data.get("checkpoints") or []):
        entries += _one_entry(item, model, f"checkpoints[{i}]")
    if not entries:
        raise ValueError("the spec lists no checkpoints: add `checkpoints:` or "
                         "`model:` + `revisions:`")
    steps = [e.step for e in entries]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        raise ValueError(f"step(s) {dup} appear more than once: give each checkpoint once "
                         "(or set `step:` explicitly)")
    entries.sort(key=lambda e: e.step)
    refs = []
    for i, item in enumerate(data.get("references") or []):
        for e in _one_entry(item, model, f"references[{i}]"):
            e.role = "reference"
            if isinstance(item, dict) and item.get("name"):
                e.label = str(item["name"])
            refs.append(e)
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"reference names {labels} repeat: give each a distinct `name:`")
    name = str(data.get("name") or model or "model")
    settings = data.get("scan") or {}
    if not isinstance(settings, dict):
        raise ValueError("`scan:` must be a mapping of scan settings (e.g. {k: 10})")
    return name, entries + refs, dict(settings)


# ------------------------------------------------------------------------------------------
# Loading one checkpoint
# ------------------------------------------------------------------------------------------
def load_checkpoint(ckpt: Checkpoint, series: str, dtype="float32",
                    trust_remote_code: bool = False) -> LoadedModel:
    """Load ``ckpt`` and label it as series ``series`` at revision ``ckpt.label``."""
    if ckpt.kind == "zero":
        from .zero import load_zero_checkpoint
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
        from .figures.training import draw_training_figures
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
