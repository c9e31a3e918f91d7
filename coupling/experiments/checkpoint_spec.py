"""One training run's checkpoint spec: read, checked and resolved to :class:`Checkpoint` entries.

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

Everything that can be checked without loading a model is checked here (keys, paths, globs,
ZeRO tags, unique steps and reference names); :mod:`coupling.experiments.checkpoints` loads and scans
the entries.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from coupling.model.gguf import is_gguf_file
from coupling.model.loading import TINY_MODEL_DIR

EMBEDDED = "embedded:tiny"
SPEC_KEYS = {"name", "model", "revisions", "checkpoints", "references", "scan"}
ENTRY_KEYS = {"path", "revision", "model", "zero", "config", "tag", "random_init", "seed",
              "step", "name"}


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
        folders = sorted(p for p in glob.glob(path) if _is_model_path(p))
        if not folders:
            raise ValueError(f"{where}: no checkpoint folder matches {raw!r} (looked for "
                             f"{path}): check the pattern")
        if "step" in entry:
            raise ValueError(f"{where}: a glob matches several folders; drop `step:` (each "
                             "step is parsed from its folder name)")
    else:
        if not _is_model_path(path):
            raise ValueError(f"{where}: checkpoint folder {raw!r} does not exist: pass a "
                             "save_pretrained folder or a .gguf file")
        folders = [path]
    return [Checkpoint("path", f, _step_of(entry, _label(f), where), _label(f)) for f in folders]


def _is_model_path(path: str) -> bool:
    """A checkpoint on disk: a save_pretrained folder, or a GGUF file."""
    return Path(path).is_dir() or is_gguf_file(path)


def _label(path: str) -> str:
    """``step-100`` of ``.../step-100`` and of ``.../step-100.gguf``."""
    name = Path(path).name
    return name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


def _zero_entry(entry: dict, where: str) -> Checkpoint:
    from coupling.model.zero import resolve_tag

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
