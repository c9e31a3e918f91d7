"""The local scan: one model, a prompt set, every measure, one output directory.

``coupling.scan(...)`` and ``coupling scan`` (CLI) share ``ScanConfig``; YAML files in
``configs/`` hold the same keys.  All input is validated (model, prompts, token lengths, K,
output directory) before the first Jacobian is taken, so bad input costs seconds and leaves
nothing behind.

Each finished prompt is saved at once in ``OUT.partial/`` (``coupling.results.store``); rerunning
the same scan after a crash computes only the prompts not saved there.  A prompt whose
analysis raises is recorded (``failures.json``) and the others go on, unless ``fail_fast``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coupling.analysis.prompt import analyze_prompt, jacobian_function_report
from coupling.errors import first_line
from coupling.analysis.memory_plan import MemoryPlan, param_counts, plan
from coupling.model import memory
from coupling.model.block_range import StreamedModel
from coupling.model.gguf import find_gguf
from coupling.model.loading import (TINY_MODEL_DIR, LoadedModel, _load_tokenizer, load_config,
                                    load_model)
from coupling.prompts.jsonl import Prompt
from coupling.prompts.sources import load_prompts, tokenize_prompt
from coupling.results.owned import LocalTree, check_replaceable, remove_owned, root_kind
from coupling.results.scan_output import (ScanResult, check_output_dir, read_scan_output,
                                          write_scan_output)
from coupling.results.store import ShardStore, plan_shards
from coupling.settings.scan_settings import ScanSettings
from coupling.settings.schema import check_keys, names, settings_dataclass

SETTINGS_KEYS = names("analysis")      # the YAML keys that go to ScanSettings
LOCAL_SHARD_SIZE = 1     # every finished prompt is saved at once (a crash loses at most one)


@settings_dataclass("scan")
class ScanConfig:
    """One local scan: the ``scan`` settings of :mod:`coupling.settings.schema` (model, prompts,
    output; listed there once, with their help) and the per-prompt ``settings``."""

    settings: ScanSettings = field(default_factory=ScanSettings)

    def __post_init__(self):
        check_device_name(self.device)

    @classmethod
    def from_dict(cls, d: dict) -> "ScanConfig":
        """From a flat mapping of ``scan`` and ``analysis`` keys (a YAML file, the flags)."""
        d = dict(d)
        check_keys(d, ("scan", "analysis"))
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
         loaded: LoadedModel | None = None, figures_in_background: bool = False,
         **kwargs) -> ScanResult:
    """Scan ``model`` (hub id / folder / None for the embedded tiny model) over prompts.

    Keyword arguments are ``ScanConfig`` / ``ScanSettings`` fields (``prompts``, ``k``,
    ``svd``, ``measures``, ``out``...).  Returns the ``ScanResult`` read back from ``out``
    (a temporary directory when ``out`` is None).  The figures (``figures``) are drawn
    before it returns, or by a detached process started as it returns when
    ``figures_in_background`` (``coupling scan``: :mod:`coupling.figures.background`).
    """
    if config is None:
        config = ScanConfig.from_dict({"model": model, **kwargs})
    cfg = config
    out = cfg.out
    if out is None:
        import tempfile
        out = str(Path(tempfile.mkdtemp(prefix="coupling-scan-")) / "result")
    check_output_dir(out, cfg.overwrite)
    partial = check_partial_dir(out, cfg.overwrite)
    t_start = time.perf_counter()
    memory.reset_peak()
    mem_plan = plan_memory(cfg) if loaded is None else None   # before anything heavy
    lm = loaded or open_model(cfg, mem_plan.mode)
    set_threads(cfg.threads, lm.info.get("d_model"))
    check_k(cfg.settings.k, lm.info.get("d_model"))
    prompts = load_prompts(cfg.prompts, cfg.max_prompts, cfg.prompt_seed)
    if not prompts:
        raise ValueError(f"prompt source {cfg.prompts!r} holds no prompts")
    token_ids = tokenize_all(lm, prompts, cfg.max_tokens)
    store = open_store(partial, cfg, lm, prompts, token_ids, cfg.overwrite)
    t_loaded, c_loaded = time.perf_counter(), time.process_time()
    run = run_prompts(lm, prompts, token_ids, cfg, progress, store=store)
    t_done, c_done = time.perf_counter(), time.process_time()
    results = run.results
    if not results:
        f = run.failures[0]
        raise PromptFailed(f"all {len(prompts)} prompts failed (first: {f['prompt_id']}: "
                           f"{f['error']})")
    n = max(run.computed, 1)
    # CPU seconds too (every thread's): on a shared machine they say more than the clock
    manifest = build_manifest(cfg, lm.info, timings={"load_s": t_loaded - t_start,
                                               "analysis_s": t_done - t_loaded,
                                               "per_prompt_s": (t_done - t_loaded) / n,
                                               "analysis_cpu_s": c_done - c_loaded,
                                               "per_prompt_cpu_s": (c_done - c_loaded) / n},
                              results=results)
    manifest["prompts"] = {"total": len(prompts), "computed": run.computed,
                           "resumed": run.resumed, "failed": len(run.failures)}
    manifest["memory"] = memory_record(mem_plan, lm)
    write_scan_output(out, manifest, results, cfg.overwrite, failures=run.failures)
    remove_store(store)
    result = read_scan_output(out)
    if cfg.figures and figures_in_background:
        from coupling.figures.background import start
        start(out)
    elif cfg.figures:
        from coupling.figures.report import draw_figures
        draw_figures(out)
    return result


def check_device_name(device: str):
    name, _, index = str(device).partition(":")
    if name == "cpu" and not index or name == "cuda" and (not index or index.isdigit()):
        return
    raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N")


def plan_memory(cfg: ScanConfig) -> MemoryPlan:
    """Where the weights will be and the predicted host peak, from the config, the
    safetensors headers and the prompts' token counts (no weights are read); a one-line
    ``MemoryPlanError`` when the scan cannot fit, even one block at a time."""
    source = str(cfg.model) if cfg.model is not None else str(TINY_MODEL_DIR)
    config = load_config(source, cfg.revision, cfg.trust_remote_code)
    folder = source if Path(source).is_dir() else None
    sizes = param_counts(config, folder, dequantized=find_gguf(source) is not None)
    check_k(cfg.settings.k, sizes.d)
    n = _longest_prompt(cfg, source, config)
    disk_ok = folder is not None and sizes.disk_bytes is not None and not cfg.random_init
    return plan(sizes, cfg.dtype, cfg.settings, n, cfg.weights, disk_ok, device=cfg.device,
                device_available=memory.device_free(cfg.device))


def check_k(k: int, d: int | None):
    """K must not exceed the width (checked from the config before loading, and after)."""
    if d is not None and k > d:
        raise ValueError(f"K={k} is larger than the model width d={d}: lower --k")


def _longest_prompt(cfg: ScanConfig, source: str, config) -> int:
    """Tokens of the longest prompt, with the model's tokenizer alone (bad prompts fail here,
    before loading); a model whose tokenizer comes with its weights (GGUF): ``--max-tokens``
    or 512, an estimate (the prompts are checked after loading)."""
    tokenizer = _load_tokenizer(source, dict(revision=cfg.revision,
                                             trust_remote_code=cfg.trust_remote_code))
    if tokenizer is None:
        return cfg.max_tokens or 512
    tokens_only = LoadedModel(None, tokenizer, config, {"id": source})
    prompts = load_prompts(cfg.prompts, cfg.max_prompts, cfg.prompt_seed)
    return max((ids.shape[1] for ids in tokenize_all(tokens_only, prompts, cfg.max_tokens)),
               default=1)


def open_model(cfg: ScanConfig, mode: str):
    """The model as ``mode`` says: loaded whole (``memory``), or its blocks left on disk."""
    if mode == "disk":
        return StreamedModel(cfg.model, cfg.dtype, cfg.trust_remote_code, cfg.block_path,
                             device=cfg.device)
    # on a GPU each tensor goes straight to the device (Accelerate), not the whole model
    # through host memory first; GGUF tensors are dequantized on the host, then moved
    on_host = cfg.device == "cpu" or cfg.random_init or find_gguf(cfg.model) is not None
    device_map = None if on_host else {"": cfg.device}
    return load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype,
                      random_init=cfg.random_init, seed=cfg.init_seed,
                      trust_remote_code=cfg.trust_remote_code,
                      device=None if cfg.device == "cpu" else cfg.device, device_map=device_map)


def memory_record(mem_plan: MemoryPlan | None, lm) -> dict:
    """The manifest's ``memory``: the mode, the measured peaks (host resident set since the
    scan started; CUDA allocator where used) and, when planned, the prediction."""
    out = {"mode": "disk" if isinstance(lm, StreamedModel) else "memory", **memory.peak()}
    if mem_plan is not None:
        out.update(mem_plan.to_dict())
    else:
        out["reason"] = "the model was given loaded"
    return out


@dataclass
class PromptRun:
    results: list          # PromptResult per prompt that succeeded, in prompt order
    failures: list         # {prompt_id, layer, error} per prompt that failed
    computed: int = 0      # prompts analysed in this run (the others came from the store)
    resumed: int = 0


def run_prompts(lm, prompts, token_ids, cfg: ScanConfig, progress: bool = True,
                store: ShardStore | None = None) -> PromptRun:
    """Analyse every prompt not already in ``store``, saving each as it finishes.

    A prompt that raises is recorded (``failure_record``) and the others go on, unless
    ``cfg.fail_fast``; failed prompts are not stored, so a rerun tries them again.
    """
    from tqdm.auto import tqdm

    shards = plan_shards(prompts, token_ids, LOCAL_SHARD_SIZE)
    done = store.done(shards) if store is not None else set()
    if done and progress:
        print(f"resuming from {store.root}: {len(done)} of {len(shards)} prompts already done",
              file=sys.stderr)
    bar = tqdm(total=len(shards), initial=len(done), desc="scan", unit="prompt",
               disable=not progress, file=sys.stderr)
    by_index, failures, computed = {}, [], 0
    try:                  # the bar's last line ends before any error is printed
        for shard, ids in zip(shards, token_ids):
            if shard.index in done:
                continue
            pid, meta = shard.prompt_ids[0], shard.metas[0]
            try:
                result = analyze_prompt(lm, ids, cfg.settings, pid, meta)
            except Exception as e:   # noqa: BLE001 -- any failure of one prompt is isolated
                if cfg.fail_fast:
                    raise PromptFailed(f"prompt {pid} failed ({first_line(e)}); without "
                                       "--fail-fast it is recorded in failures.json and the "
                                       "scan goes on") from e
                failures.append(failure_record(pid, e))
            else:
                by_index[shard.index] = result
                if store is not None:
                    store.write(shard, [result])
            computed += 1
            bar.update(1)
    finally:
        bar.close()
    if done:
        for shard in shards:
            if shard.index in done:
                by_index[shard.index] = store.read(shard)[0]
        store.report_foreign()
    results = [by_index[s.index] for s in shards if s.index in by_index]
    return PromptRun(results, failures, computed, len(done))


class PromptFailed(RuntimeError):
    """A prompt's analysis raised and ``fail_fast`` was set."""


def failure_record(prompt_id: str, e: BaseException) -> dict:
    """What failures.json says about one failed prompt; the layer when the error names it
    (``layer 3``, or a zero step ``x^3 == x^2``: block 3 did not move the state)."""
    m = re.search(r"\blayer (\d+)", str(e)) or re.search(r"x\^(\d+) == x\^\d+", str(e))
    return {"prompt_id": prompt_id, "layer": int(m.group(1)) if m else None,
            "error": f"{type(e).__name__}: {first_line(e)}"}


# ------------------------------------------------------------------------------------------
# The store of finished prompts: OUT.partial/ beside the output, until the scan is written
# ------------------------------------------------------------------------------------------
def partial_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_partial_dir(out, overwrite: bool) -> Path:
    """``OUT.partial``: absent, or a shard folder of coupling (else a one-line error)."""
    partial = partial_dir(out)
    tree = LocalTree(partial)
    if partial.is_file() or (partial.exists() and tree.files()
                             and root_kind(tree) != "shards"):
        raise ValueError(f"{partial} exists and is not a coupling shard folder (where a scan "
                         f"into {out} keeps its finished prompts): move it away")
    if overwrite:
        check_replaceable(tree, kinds=("shards",))
    return partial


def open_store(partial: Path, cfg: ScanConfig, lm, prompts, token_ids, overwrite: bool):
    """The store in ``partial`` for this exact scan; ``overwrite`` discards what it held."""
    if overwrite:
        remove_owned(LocalTree(partial), kinds=("shards",))
    store = ShardStore(partial)
    store.check_plan(scan_plan(cfg, lm.info, prompts, token_ids))
    store.clean_partial()
    return store


def scan_plan(cfg: ScanConfig, info: dict, prompts, token_ids) -> dict:
    """What must not change between a run and its resume: model, settings, prompts."""
    volatile = ("out", "overwrite", "figures", "threads", "fail_fast", "weights")
    digest = hashlib.sha256()
    for p, ids in zip(prompts, token_ids):
        digest.update(json.dumps([p.id, p.text, ids.reshape(-1).tolist()]).encode())
    return {"format": "coupling-local-scan/1", "shard_size": LOCAL_SHARD_SIZE,
            "config": {k: v for k, v in cfg.to_dict().items() if k not in volatile},
            "model": info, "prompts": [p.id for p in prompts],
            "prompts_sha256": digest.hexdigest()}


def remove_store(store: ShardStore):
    """Delete the shards once the output is written (files that are not ours stay)."""
    left = remove_owned(LocalTree(store.root), kinds=("shards",), strict=False)
    if left:
        warnings.warn(f"kept {store.root}: it holds files coupling did not write "
                      f"({', '.join(left[:5])})", stacklevel=2)


def build_manifest(cfg: ScanConfig, info: dict, timings: dict, results=()) -> dict:
    """The manifest of one scan: config, model ``info`` (``LoadedModel.info``), versions,
    timings, and which function every layer's Jacobians were taken of."""
    n_layers = info.get("n_layers") or 0
    mean_tokens = (sum(r.n_tokens for r in results) / len(results)) if results else None
    return {"format": "coupling-scan/1", "config": cfg.to_dict(), "model": dict(info),
            "versions": package_versions(), "timings": timings,
            "jacobians": jacobian_function_report(results, n_layers, mean_tokens),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
