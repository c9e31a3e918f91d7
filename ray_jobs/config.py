"""The distributed scan's YAML: a list of models, prompt sources, scan settings, Ray options.

Example (``configs/ray_example.yaml``)::

    out: runs/ray-pythia
    models:
      - id: EleutherAI/pythia-160m          # hub id; or `path: /models/x` for a folder
        revisions: [step1000, step143000]
        dtype: float32
      - path: /models/llama-70b
        stages: 8                          # force block-range placement with 8 stages
    prompts: builtin
    max_prompts: 100
    k: 10                                  # ...every other ScanSettings / ScanConfig key
    shard_size: 10                         # prompts per shard (unit of work and of resume)

A single ``model:`` (the local scan's key) is accepted instead of ``models:`` so that
``coupling scan --ray`` can pass its flat config.  Unknown keys are an error.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from coupling.model.gguf import is_gguf_file
from coupling.scan import ScanConfig
from coupling.settings.schema import BY_NAME, check_keys, names, settings_dataclass

# Keys of the local scan that belong to a model (a models[] entry may set them).
MODEL_KEYS = tuple(s.name for s in BY_NAME.values() if s.per_model and s.group == "scan")
PLACEMENT_KEYS = tuple(s.name for s in BY_NAME.values() if s.per_model and s.group == "ray")
ENTRY_KEYS = {"id", "path", "revision", "revisions", *MODEL_KEYS, *PLACEMENT_KEYS}
PLACEMENTS = BY_NAME["placement"].choices


@settings_dataclass("ray")
class RayOptions:
    """How work is spread over the cluster: the ``ray`` settings of :mod:`coupling.settings.schema`
    (top-level YAML keys of the same names; listed there once, with their help)."""

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got "
                             f"{self.placement!r}")
        for name in ("stages", "replicas", "max_in_flight"):
            _positive_int(name, getattr(self, name), allow_none=True)
        _positive_int("shard_size", self.shard_size)
        for name in ("max_restarts", "max_task_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.stages is not None and self.replicas is not None:
            raise ValueError("give either stages or replicas, not both")


RAY_KEYS = names("ray")


@dataclass
class ModelJob:
    """One (model, revision) to scan, with its own local-scan config and placement."""

    key: str                  # output subdirectory, unique per (model, revision, init)
    scan: ScanConfig          # model / revision / dtype ... and the scan settings
    placement: str = "auto"
    stages: int | None = None
    replicas: int | None = None

    @property
    def source(self) -> str:
        from coupling.model.loading import TINY_MODEL_DIR
        return str(self.scan.model) if self.scan.model is not None else str(TINY_MODEL_DIR)


@dataclass
class RayScanConfig:
    out: str
    jobs: list
    options: RayOptions
    overwrite: bool = False
    raw: dict = field(default_factory=dict)


def parse_config(data: dict, *, out: str | None = None, address: str | None = None,
                 overrides: dict | None = None) -> RayScanConfig:
    """Validate a config mapping (YAML) into jobs; every problem is a one-line ValueError."""
    if not isinstance(data, dict):
        raise ValueError("the config must be a mapping of keys")
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    check_keys(data, ("scan", "analysis", "ray"), extra=("models",))
    ray_opts = RayOptions(**{k: data[k] for k in RAY_KEYS if k in data})
    if address is not None:
        ray_opts.address = address
    shared = {k: v for k, v in data.items() if k in names("scan", "analysis")}
    check_local_only(shared)
    out = out or shared.pop("out", None) or os.path.join("runs", "ray-" + _stamp())
    shared.pop("out", None)
    overwrite = bool(shared.pop("overwrite", False))
    entries = _model_entries(data, shared)
    jobs = []
    for entry in entries:
        jobs.extend(_jobs_for(entry, shared, ray_opts, out))
    keys = [j.key for j in jobs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"models listed twice: {dup}: remove the duplicates")
    return RayScanConfig(str(out), jobs, ray_opts, overwrite, dict(data))


# local-scan settings a Ray scan has its own way of saying (never silently ignored)
LOCAL_ONLY = {"device": ("cpu", "a Ray scan puts actors on GPUs when the cluster has them "
                                "(gpus_per_actor)"),
              "weights": ("auto", "a Ray scan splits a model too large for one worker into "
                                  "block ranges (placement: stages)")}


def check_local_only(shared: dict):
    for key, (default, instead) in LOCAL_ONLY.items():
        if key in shared and shared[key] != default:
            raise ValueError(f"{key}: {shared[key]} is a setting of the local scan: {instead}; "
                             f"remove it from the Ray config (or the --{key} flag)")


def _model_entries(data: dict, shared: dict) -> list:
    if "models" in data and "model" in data:
        raise ValueError("give either 'model' (one) or 'models' (a list), not both")
    if "models" not in data:
        return [{"id": shared.get("model"), "revision": shared.get("revision")}]
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ValueError("'models' must be a non-empty list of {id|path, revisions, dtype, "
                         "random_init} entries")
    out = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"id": m}
        if not isinstance(m, dict):
            raise ValueError(f"models[{i}] must be a mapping or a model id, got {m!r}")
        bad = sorted(k for k in m if k not in ENTRY_KEYS)
        if bad:
            raise ValueError(f"models[{i}]: unknown key(s) {bad}: valid keys are "
                             f"{', '.join(sorted(ENTRY_KEYS))}")
        if ("id" in m) == ("path" in m):
            raise ValueError(f"models[{i}] needs exactly one of 'id' (hub id) or 'path' (folder)")
        out.append(m)
    return out


def _jobs_for(entry: dict, shared: dict, opts: RayOptions, out: str) -> list:
    source = entry.get("id", entry.get("path"))
    if "path" in entry and not (Path(str(entry["path"])).is_dir()
                                or is_gguf_file(entry["path"])):
        raise ValueError(f"model folder {entry['path']!r} does not exist: fix 'path' "
                         "(a save_pretrained folder or a .gguf file)")
    if "revision" in entry and "revisions" in entry:
        raise ValueError(f"model {source}: give 'revision' or 'revisions', not both")
    revisions = entry.get("revisions", [entry.get("revision")])
    if not isinstance(revisions, list) or not revisions:
        raise ValueError(f"model {source}: 'revisions' must be a non-empty list")
    jobs = []
    for rev in revisions:
        d = {**shared, "model": source, "revision": None if rev is None else str(rev)}
        d.update({k: entry[k] for k in MODEL_KEYS if k in entry})
        scan = ScanConfig.from_dict(d)
        key = model_key(scan)
        scan.out = os.path.join(out, key) if "://" not in out else f"{out.rstrip('/')}/{key}"
        placement = entry.get("placement", opts.placement)
        stages = entry.get("stages", opts.stages if "replicas" not in entry else None)
        replicas = entry.get("replicas", opts.replicas if "stages" not in entry else None)
        tmp = RayOptions(placement=placement, stages=stages, replicas=replicas)  # validates
        if tmp.stages is not None and tmp.placement == "replicas":
            raise ValueError(f"model {source}: stages given with placement 'replicas'")
        if tmp.replicas is not None and tmp.placement == "stages":
            raise ValueError(f"model {source}: replicas given with placement 'stages'")
        jobs.append(ModelJob(key, scan, tmp.placement, tmp.stages, tmp.replicas))
    return jobs


def model_key(scan: ScanConfig) -> str:
    """Output subdirectory of a (model, revision, init): readable and unique.

    ``EleutherAI/pythia-70m@step128``; local folders get their name plus a short hash of the
    path as written (two folders called ``model`` must not collide; not the absolute path,
    which changes with the working directory a Ray job unpacks to, so resuming a job's
    output finds its shards); ``+random-s0`` marks a random initialisation.
    """
    source = scan.model
    if source is None:
        name = "embedded-tiny"
    elif os.path.exists(str(source)):      # a local folder or file (a GGUF file)
        path = os.path.normpath(str(source))
        name = f"{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"
    else:
        name = str(source).replace("/", "--")
    if scan.revision:
        name += f"@{scan.revision}"
    if scan.random_init:
        name += f"+random-s{scan.init_seed}"
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", name)


def _positive_int(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _stamp() -> str:
    import time
    return time.strftime("%Y%m%d-%H%M%S")
