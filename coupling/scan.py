"""The local scan: one model, a prompt set, every measure, one output directory.

``coupling.scan(...)`` and ``coupling scan`` (CLI) share ``ScanConfig``; YAML files in
``configs/`` hold the same keys.  All input is validated (model, prompts, token lengths, K,
output directory) before the first Jacobian is taken, so bad input costs seconds and leaves
nothing behind.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .analysis import ScanSettings, analyze_prompt
from .loading import LoadedModel, load_model
from .prompts import Prompt, load_prompts, tokenize_prompt
from .results import ScanResult, check_output_dir, read_scan_output, write_scan_output

SETTINGS_KEYS = {f.name for f in dataclasses.fields(ScanSettings)}


@dataclass
class ScanConfig:
    model: str | None = None          # hub id or folder; None = the embedded tiny model
    revision: str | None = None
    dtype: str = "float32"
    random_init: bool = False
    init_seed: int = 0
    trust_remote_code: bool = False
    block_path: str | None = None
    prompts: str = "builtin"
    max_prompts: int | None = None
    prompt_seed: int | None = None
    max_tokens: int | None = None     # truncate prompts to their first N tokens
    out: str | None = None
    overwrite: bool = False
    figures: bool = True
    threads: int | None = None        # torch intra-op threads; None: 1 for d <= 256, else torch's default
    settings: ScanSettings = field(default_factory=ScanSettings)

    @classmethod
    def from_dict(cls, d: dict) -> "ScanConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"settings"}
        bad = [k for k in d if k not in known and k not in SETTINGS_KEYS]
        if bad:
            raise ValueError(f"unknown config key(s) {bad}: valid keys are "
                             f"{', '.join(sorted(known | SETTINGS_KEYS))}")
        settings = ScanSettings(**{k: d.pop(k) for k in list(d) if k in SETTINGS_KEYS})
        return cls(**d, settings=settings)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        d.update(self.settings.to_dict())
        return d


def load_config_file(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {p} not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of settings")
    return data


def context_length(lm: LoadedModel) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(lm.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_all(lm: LoadedModel, prompts: list[Prompt], max_tokens: int | None):
    """Token ids of every prompt, validated up front (empty / too long -> clear error)."""
    if lm.tokenizer is None or not callable(lm.tokenizer):
        raise ValueError(f"model {lm.info['id']} has no tokenizer: save one beside the weights")
    limit = context_length(lm)
    out = []
    for p in prompts:
        ids = tokenize_prompt(lm.tokenizer, p, max_length=None)
        if max_tokens is not None:
            ids = ids[:, :max_tokens]
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(f"prompt {p.id} has {ids.shape[1]} tokens, more than the model's "
                             f"context of {limit}: shorten it or pass --max-tokens {limit}")
        out.append(ids)
    return out


def set_threads(threads: int | None, d_model: int | None):
    """Small widths run fastest on one thread: with tiny matrices, OpenMP synchronisation
    costs more than it saves (measured 0.09 s vs 5.2 s per prompt for d=64 on a busy 2-core
    machine)."""
    import torch

    if threads is None and d_model is not None and d_model <= 256:
        threads = 1
    if threads is not None:
        torch.set_num_threads(int(threads))


def package_versions() -> dict:
    import importlib.metadata as md

    vers = {"python": platform.python_version()}
    for name in ("coupling", "torch", "transformers", "numpy", "scipy", "pandas", "accelerate"):
        try:
            vers[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return vers


def scan(model: str | None = None, *, config: ScanConfig | None = None, progress: bool = True,
         loaded: LoadedModel | None = None, **kwargs) -> ScanResult:
    """Scan ``model`` (hub id / folder / None for the embedded tiny model) over prompts.

    Keyword arguments are ``ScanConfig`` / ``ScanSettings`` fields (``prompts``, ``k``,
    ``svd``, ``measures``, ``out``...).  Returns the ``ScanResult`` read back from ``out``
    (a temporary directory when ``out`` is None).
    """
    if config is None:
        config = ScanConfig.from_dict({"model": model, **kwargs})
    cfg = config
    out = cfg.out
    if out is None:
        import tempfile
        out = str(Path(tempfile.mkdtemp(prefix="coupling-scan-")) / "result")
    check_output_dir(out, cfg.overwrite)
    t_start = time.perf_counter()
    lm = loaded or load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype,
                              random_init=cfg.random_init, seed=cfg.init_seed,
                              trust_remote_code=cfg.trust_remote_code)
    set_threads(cfg.threads, lm.info.get("d_model"))
    if cfg.settings.k > (lm.info.get("d_model") or cfg.settings.k):
        raise ValueError(f"K={cfg.settings.k} is larger than the model width "
                         f"d={lm.info['d_model']}: lower --k")
    prompts = load_prompts(cfg.prompts, cfg.max_prompts, cfg.prompt_seed)
    if not prompts:
        raise ValueError(f"prompt source {cfg.prompts!r} holds no prompts")
    token_ids = tokenize_all(lm, prompts, cfg.max_tokens)
    t_loaded = time.perf_counter()
    results = run_prompts(lm, prompts, token_ids, cfg, progress)
    t_done = time.perf_counter()
    manifest = build_manifest(cfg, lm, timings={"load_s": t_loaded - t_start,
                                               "analysis_s": t_done - t_loaded,
                                               "per_prompt_s": (t_done - t_loaded) / len(prompts)})
    write_scan_output(out, manifest, results, cfg.overwrite)
    result = read_scan_output(out)
    if cfg.figures:
        from .report import draw_figures
        draw_figures(out)
    return result


def run_prompts(lm, prompts, token_ids, cfg: ScanConfig, progress: bool = True):
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(prompts), desc="scan", unit="prompt", disable=not progress,
               file=sys.stderr)
    for p, ids in zip(prompts, token_ids):
        meta = {**p.meta, "text": p.text}
        results.append(analyze_prompt(lm, ids, cfg.settings, p.id, meta))
        bar.update(1)
    bar.close()
    return results


def build_manifest(cfg: ScanConfig, lm: LoadedModel, timings: dict) -> dict:
    return {"format": "coupling-scan/1", "config": cfg.to_dict(), "model": dict(lm.info),
            "versions": package_versions(), "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
