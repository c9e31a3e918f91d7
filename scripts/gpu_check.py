#!/usr/bin/env python3
"""GPU check: the scan on a real accelerator, at LLM width, against the authors' method.

One command, one output folder, a fixed time budget (under 8 minutes on one GPU; the smoke
mode runs the same steps on tiny shapes in under 2 minutes on a CPU).  Steps, each in its
own subprocess with a hard time limit, so one failure or overrun does not stop the rest:

1. ``machine``: the machine line (GPU, torch, CUDA, transformers...) and an import check of
   every ``coupling`` module on this stack with Ray made unimportable.
2. ``tests``: ``tests/test_fastpath.py`` and ``tests/test_blocks_jacobian.py`` on the device,
   models in float32 and in bf16 (``COUPLING_TEST_DEVICE`` / ``COUPLING_TEST_DTYPE``;
   Jacobians are float32 either way).  Without pytest a small stand-in runs the test
   functions directly.
3. ``scan``: a random Llama-7B-shaped model (32 layers, d = 4096, 32 heads, 8 KV heads,
   ffn 11008; bf16 weights, eager attention) and one prompt of 64 random token ids through
   ``coupling.analysis.prompt.analyze_prompt`` (``measures=("depth",)``) at K = 10 and 50, with
   ``svd="auto"`` (the default) and ``svd="exact"``.  Each variant is first timed on one
   layer; a variant whose estimate does not fit the step's budget is reported as an
   estimate and not run.  Peak device memory per run.
4. ``authors``: the authors' method (``ScanSettings(jacobian="full", svd="exact")``: d VJPs
   through the block on the whole prompt, full SVD) on 2 layers, timed per layer and
   extrapolated to all layers (labelled so), against the fast path on the same layers
   (Jacobians, singular values, mis-coupling).  Also dense SVD against ARPACK on the real
   Jacobian of the first of those layers.
5. ``svd``: dense ``torch.linalg.svd`` on the device against ARPACK on the dense matrix (CPU,
   and with products on the device) for d = 1024..8192 and K = 10, 50 -- the measurement
   ``coupling.spectrum.svd.full_svd_pays`` lacks for accelerators.

Outputs in OUTDIR: ``summary.md`` (every step's status, time and tables, the goals),
``summary.json``, ``<step>.md/.json/.csv`` and ``logs/<step>.log``.

    scripts/gpu_check.sh OUTDIR                        # the GPU run (--device cuda)
    scripts/gpu_check.sh OUTDIR --device cpu --smoke   # tiny shapes on a CPU
    python3 scripts/gpu_check.py OUTDIR --steps scan,authors --device cpu --smoke
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("machine", "tests", "scan", "authors", "svd")
KS = (10, 50)
# Hard limit per step (seconds) and for the whole run; the GPU total stays under 8 minutes
# including this driver's own start.  Steps also check the clock themselves and skip work
# that would not fit, so a limit is rarely what ends a step.
BUDGET = {
    "full": {"machine": 30, "tests": 110, "scan": 140, "authors": 90, "svd": 50, "total": 420},
    # smoke: ~80 s on an idle 2-core machine; the limits leave room for a loaded (5x) one
    "smoke": {"machine": 40, "tests": 120, "scan": 45, "authors": 35, "svd": 25, "total": 240},
}
# Llama-2-7B's block shape with GQA (8 KV heads), and the smoke shape (same code path).
SHAPES = {
    "full": dict(layers=32, d=4096, heads=32, kv_heads=8, ffn=11008, vocab=32000, n=64,
                 authors_layers=2, svd_d=(1024, 2048, 4096, 8192)),
    "smoke": dict(layers=4, d=128, heads=4, kv_heads=2, ffn=344, vocab=256, n=16,
                  authors_layers=2, svd_d=(128, 256)),
}
# Never imported by this check: the GPU machine has no Ray, and the library must not need
# it.  The smoke mode also hides what that machine lacks (pyarrow, datasets).
ALWAYS_BLOCKED = ("ray",)
TARGET_MISSING = ("pyarrow", "datasets")
TEST_FILES = ("tests/test_fastpath.py", "tests/test_blocks_jacobian.py")
# The start of a test process: the comma list in argv[1] made unimportable (block_imports).
BLOCK_CODE = "import sys; [sys.modules.__setitem__(m, None) for m in sys.argv[1].split(',')]; "


# ------------------------------------------------------------------------------------------
# arguments, context, small helpers
# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="folder for logs and tables (created)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU run in < 2 min)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--dtype", default="bfloat16", help="weights of the scan model (bf16)")
    p.add_argument("--total", type=float, default=None, help="overall budget in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 in smoke mode, torch's own otherwise)")
    p.add_argument("--tests-k", default=None, help="pytest -k expression for the tests step")
    p.add_argument("--runner", choices=("auto", "pytest", "standin"), default="auto",
                   help="tests step: pytest, the stand-in runner, or pytest when installed")
    p.add_argument("--emulate-target", action=argparse.BooleanOptionalAction, default=None,
                   help="hide pyarrow and datasets as on the GPU machine (default: in smoke)")
    p.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"unknown step(s) {bad}: use a comma list of {', '.join(STEPS)}")
    args.steps = steps
    if args.emulate_target is None:
        args.emulate_target = args.smoke
    return args


@dataclass
class Ctx:
    out: Path
    device: str
    smoke: bool
    dtype: str
    budget: float
    threads: int | None
    tests_k: str | None
    emulate_target: bool
    runner: str
    t0: float

    @property
    def shape(self) -> dict:
        return SHAPES["smoke" if self.smoke else "full"]

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def block_imports(names) -> None:
    """Make ``names`` unimportable (``import ray`` raises ModuleNotFoundError naming the chain
    in its traceback) and invisible to ``importlib.util.find_spec`` -- as if not installed."""
    for name in names:
        sys.modules[name] = None


def sync(device: str):
    """Wait for queued device work, so clock reads cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def timed(fn, device: str):
    """``(seconds, result)`` of ``fn()``, device work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def peak_memory(device: str, box: dict):
    """Fill ``box['peak_gb']`` with the peak allocated device memory inside the block."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    try:
        yield box
    finally:
        box["peak_gb"] = (torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
                          if cuda else None)


def write_table(out: Path, name: str, rows: list[dict], title: str, note: str = ""):
    """``name.csv`` and ``name.json`` (rows), ``name.md`` (a markdown table): rewritten after
    every row, so a step stopped by its time limit leaves what it measured."""
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))
    lines = [f"### {title}", ""] + ([note, ""] if note else [])
    if rows:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "/")


def version(dist: str) -> str:
    """Installed version of a distribution (read from metadata: nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


# ------------------------------------------------------------------------------------------
# step: machine (and the import check of the library on this stack)
# ------------------------------------------------------------------------------------------
def step_machine(ctx: Ctx):
    import torch
    import transformers

    dev = torch.device(ctx.device)
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "device": ctx.device, "smoke": ctx.smoke}
    for dist in ("accelerate", "numpy", "scipy", "pandas", "matplotlib", "safetensors",
                 "pytest", "ray", "pyarrow", "datasets", "pyyaml", "tqdm"):
        info[dist] = version(dist)
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        info.update(gpu=prop.name, gpu_memory_gb=round(prop.total_memory / 2**30, 1),
                    compute_capability=f"{prop.major}.{prop.minor}",
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    else:
        info["gpu"] = "none (CPU run)"
    line = (f"{info['gpu']}; torch {info['torch']} (CUDA {info['torch_cuda']}), transformers "
            f"{info['transformers']}, Python {info['python']}, {info['cpus']} CPUs"
            + (f", driver {info.get('driver')}" if dev.type == "cuda" else ""))
    info["line"] = line
    ctx.log(f"machine: {line}")
    stack = import_check()
    failed = [r for r in stack if r["status"] != "ok"]
    info["modules_checked"], info["modules_failed"] = len(stack), len(failed)
    (ctx.out / "machine.json").write_text(json.dumps(info, indent=1, default=str))
    write_table(ctx.out, "stack", stack, "Import check (Ray and the blocked packages unimportable)",
                f"Blocked: {', '.join(_blocked(ctx))}. Machine: {line}")
    for r in failed:
        ctx.log(f"import of {r['module']} failed: {r['error']}")
    if failed:
        raise RuntimeError(f"{len(failed)} coupling module(s) do not import on this stack "
                           f"(stack.md): {', '.join(r['module'] for r in failed)}")


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def import_check() -> list[dict]:
    """Import every ``coupling`` module; a failure records its first error line and whether
    the blocked Ray was the cause (with the import chain)."""
    import pkgutil

    import coupling

    rows = []
    for mod in sorted(m.name for m in pkgutil.walk_packages(coupling.__path__, "coupling.")):
        try:
            importlib.import_module(mod)
            rows.append({"module": mod, "status": "ok", "error": ""})
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            chain = [f"{Path(f.filename).name}:{f.lineno}"
                     for f in traceback.extract_tb(e.__traceback__)
                     if not f.filename.startswith("<") and "importlib" not in f.filename]
            first = str(e).splitlines()[0] if str(e) else ""
            rows.append({"module": mod, "status": "failed",
                         "error": f"{type(e).__name__}: {first} (import chain: "
                                  f"{' > '.join(chain[-6:])})"})
    return rows


# ------------------------------------------------------------------------------------------
# step: tests (the two test files on the device, float32 and bf16 models)
# ------------------------------------------------------------------------------------------
def step_tests(ctx: Ctx):
    found = importlib.util.find_spec("pytest") is not None
    have_pytest = found if ctx.runner == "auto" else ctx.runner == "pytest"
    runner = "pytest" if have_pytest else \
        f"stand-in runner ({'pytest absent' if not found else 'asked for'})"
    ctx.log(f"tests: {', '.join(TEST_FILES)} on {ctx.device} with {runner}")
    rows = []
    for dtype in ("float32", "bfloat16"):
        left = ctx.left() - 5
        if left < 10:
            rows.append({"dtype": dtype, "runner": runner, "status": "not run (time budget)"})
            continue
        env = dict(os.environ, COUPLING_TEST_DEVICE=ctx.device, COUPLING_TEST_DTYPE=dtype,
                   PYTHONPATH=_pythonpath())
        junit = ctx.out / f"tests_{dtype}.xml"
        args = [str(REPO / f) for f in TEST_FILES]
        if have_pytest:
            cmd = ["-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
            cmd += ["-k", ctx.tests_k] if ctx.tests_k else []
            code = BLOCK_CODE + "import pytest; sys.exit(pytest.main(sys.argv[2:]))"
        else:
            cmd = [str(junit), ctx.tests_k or "", *args]
            code = (BLOCK_CODE + f"sys.path.insert(0, {str(REPO / 'scripts')!r}); "
                    "import gpu_check; sys.exit(gpu_check.mini_pytest_main(sys.argv[2:]))")
        full = [sys.executable, "-c", code, ",".join(_blocked(ctx)), *cmd]
        log = ctx.out / "logs" / f"tests_{dtype}.log"
        t0 = time.perf_counter()
        rc = run_limited(full, log, left, env=env, cwd=REPO)
        sec = time.perf_counter() - t0
        counts = junit_counts(junit)
        status = "timeout" if rc is None else ("ok" if rc == 0 else f"failed (rc {rc})")
        rows.append({"dtype": dtype, "runner": runner, "status": status, "seconds": sec,
                     **counts, "log": f"logs/{log.name}"})
        ctx.log(f"tests {dtype}: {status} in {sec:.1f}s {counts}")
        for line in _failure_lines(log):
            ctx.log(f"  {line}")
        write_table(ctx.out, "tests", rows, f"Fast-path and block-replay tests on {ctx.device}",
                    "Models in the given dtype; Jacobians always float32. "
                    "Variables: COUPLING_TEST_DEVICE, COUPLING_TEST_DTYPE.")
    if any(r["status"] != "ok" for r in rows):
        raise RuntimeError("some test runs failed or did not run (tests.md)")


def _failure_lines(log: Path) -> list[str]:
    if not log.exists():
        return []
    text = log.read_text(errors="replace").splitlines()
    return [ln for ln in text if ln.startswith(("FAILED", "ERROR"))][:20]


def junit_counts(path: Path) -> dict:
    """Tests, failures, errors, skipped from a JUnit XML file (pytest's or the stand-in's)."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"tests": None, "failures": None, "errors": None, "skipped": None}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in out:
            out[k] += int(s.get(k, 0))
    return out


def _pythonpath() -> str:
    return os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])


def _blocked(ctx: Ctx) -> tuple:
    return ALWAYS_BLOCKED + (TARGET_MISSING if ctx.emulate_target else ())


# ------------------------------------------------------------------------------------------
# the scan model
# ------------------------------------------------------------------------------------------
def llama_config(shape: dict):
    import transformers as tf

    return tf.LlamaConfig(num_hidden_layers=shape["layers"], hidden_size=shape["d"],
                          intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                          max_position_embeddings=max(256, 2 * shape["n"]),
                          architectures=["LlamaForCausalLM"])


def build_llama(ctx: Ctx):
    """``(LoadedModel, input_ids, info)``: random Llama (eager attention) built on the device.

    ``LoadedModel`` is built directly from the in-memory model (as the tests do);
    ``coupling.load_model`` only reads configs/weights from the hub or a folder.
    """
    import torch

    from coupling.model.loading import LoadedModel, parse_dtype
    from coupling.model.zoo import build_random

    cfg = llama_config(ctx.shape)
    dtype = parse_dtype(ctx.dtype)
    t0 = time.perf_counter()
    with torch.device(ctx.device):       # parameters are created (and initialised) there
        model = build_random(cfg, seed=0, dtype=dtype)
    model = model.to(ctx.device)          # no-op when the device context was honoured
    sync(ctx.device)
    info = {"build_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()),
            "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "dtype": ctx.dtype, **ctx.shape}
    lm = LoadedModel(model, None, cfg, {"n_layers": ctx.shape["layers"]})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ctx.shape["vocab"], (1, ctx.shape["n"]), generator=gen)
    ctx.log(f"model: Llama {ctx.shape['layers']} layers, d={ctx.shape['d']}, "
            f"{ctx.shape['heads']}/{ctx.shape['kv_heads']} heads, ffn {ctx.shape['ffn']}, "
            f"{info['params'] / 1e9:.2f}B params {ctx.dtype} ({info['weights_gb']:.1f} GiB) "
            f"built in {info['build_s']:.1f}s on {lm.device}")
    return lm, ids, info


# ------------------------------------------------------------------------------------------
# step: scan (analyze_prompt, depth-wise, K = 10 / 50, svd auto / exact)
# ------------------------------------------------------------------------------------------
def step_scan(ctx: Ctx):
    """The exact-SVD route first (cheap on a GPU), then the default ``svd="auto"`` (at
    d > 2048: ARPACK on the matrix-free one-token operator), each probed on one layer and run
    in full only when its estimate fits the time left."""
    from coupling.model.trajectory import run_forward

    lm, ids, minfo = build_llama(ctx)
    timed(lambda: run_forward(lm, ids), ctx.device)                  # warm-up
    fwd_s, rec = timed(lambda: run_forward(lm, ids), ctx.device)
    table = _ScanTable(ctx, minfo, fwd_s)
    for svd in ("exact", "auto"):
        est = {k: _probe(ctx, lm, rec, k, svd, fwd_s) for k in KS}
        for k in sorted(KS, key=est.get):
            table.add(_scan_variant(ctx, lm, ids, k, svd, est[k], minfo))
    for k in KS:     # both routes are exact: same Jacobians, different top-K algorithm
        a, b = table.grids.get(f"K{k}_auto"), table.grids.get(f"K{k}_exact")
        if a is not None and b is not None:
            table.row(k, "auto")["rel_diff_vs_exact"] = _rel_mean(a, b)
    table.write()
    if not any(r["status"] == "ok" for r in table.rows):
        raise RuntimeError("no scan variant fitted the time budget (scan.md has the estimates)")


class _ScanTable:
    def __init__(self, ctx, minfo, fwd_s):
        self.ctx, self.minfo, self.fwd_s = ctx, minfo, fwd_s
        self.rows, self.grids = [], {}

    def add(self, row_grid):
        row, grid = row_grid
        self.rows.append(row)
        if grid is not None:
            self.grids[f"K{row['K']}_{row['svd']}"] = grid
            _save_grids(self.ctx.out / "scan_grids.npz", self.grids)
        self.write()

    def row(self, k, svd):
        return next(r for r in self.rows if r["K"] == k and r["svd"] == svd)

    def write(self):
        write_table(self.ctx.out, "scan", self.rows, _scan_title(self.ctx, self.minfo),
                    _scan_note(self.fwd_s))


def _probe(ctx, lm, rec, k, svd, fwd_s) -> float:
    """Estimated seconds of the whole scan: forward + L x the time of layer 1."""
    from coupling.analysis.steps import layer_jacobians, layer_svds, norm_kind
    from coupling.settings.scan_settings import ScanSettings

    s = ScanSettings(k=k, svd=svd, measures=("depth",))
    kind, t = norm_kind(lm.model), rec.n_tokens - 1
    sec, _ = timed(lambda: layer_svds(layer_jacobians(rec, [1], t, s, lm.model, kind), s),
                   ctx.device)
    est = fwd_s + rec.n_layers * sec
    ctx.log(f"probe K={k} svd={svd}: layer 1 {sec:.2f}s -> estimated {est:.1f}s for "
            f"{rec.n_layers} layers")
    return est


def _scan_variant(ctx, lm, ids, k, svd, estimate, minfo):
    """``(row, grid)``: one ``analyze_prompt`` call, or a row saying why it was not run."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.settings.scan_settings import ScanSettings
    from coupling.spectrum.svd import resolve_method

    L, n, d = ctx.shape["layers"], ctx.shape["n"], ctx.shape["d"]
    dense = resolve_method(svd, d) == "exact"
    route = ("dense one-token J + " + ("full SVD" if svd == "exact" else "auto top-K")) if dense \
        else "ARPACK on the one-token operator (matrix-free)"
    row = {"L": L, "d": d, "n": n, "K": k, "svd": svd, "route": route, "estimate_s": estimate}
    if estimate * 1.3 + 5 > ctx.left():
        row.update(status="not run: estimate exceeds the time left", seconds=None)
        ctx.log(f"scan K={k} svd={svd}: not run (estimated {estimate:.1f}s, "
                f"{ctx.left():.0f}s left)")
        return row, None
    s = ScanSettings(k=k, svd=svd, measures=("depth",))
    box = {}
    with peak_memory(ctx.device, box):
        sec, res = timed(lambda: analyze_prompt(lm, ids, s), ctx.device)
    funcs = getattr(res, "jacobian_functions", {}).get("depth", {})
    one_tok = sum(1 for v in funcs.values() if v and v[0] == "one-token")
    row.update(status="ok", seconds=sec, forward_s=res.timings.get("forward"),
               depth_s=res.timings.get("depth"),
               mean_mis_coupling=res.summary["depth_mis_coupling_mean"],
               peak_gb=box["peak_gb"], weights_gb=minfo["weights_gb"],
               one_token_layers=f"{one_tok}/{L}" if funcs else "n/a")
    ctx.log(f"scan K={k} svd={svd}: {sec:.2f}s, mean m~ {row['mean_mis_coupling']:.6f}, "
            f"peak {_gb(box['peak_gb'])}, one-token layers {row['one_token_layers']}")
    grid = res.depth_normalized
    del res
    _free(ctx.device)
    return row, grid


def _scan_title(ctx, minfo):
    return (f"Depth-wise scan of one prompt (analyze_prompt, measures=depth): random Llama, "
            f"{ctx.shape['layers']} layers, d={ctx.shape['d']}, GQA {ctx.shape['heads']}/"
            f"{ctx.shape['kv_heads']}, {ctx.dtype} weights, n={ctx.shape['n']}, {ctx.device}")


def _scan_note(fwd_s):
    return (f"seconds: the whole analyze_prompt call (forward included; the model forward alone "
            f"took {fwd_s:.3f}s warm). estimate_s: forward + L x the first layer's time. "
            "peak_gb: torch.cuda.max_memory_allocated during the call (weights included).")


def _gb(x):
    return "n/a" if x is None else f"{x:.1f} GiB"


def _rel_mean(a, b) -> float:
    from coupling.measures.coupling_scores import mean_off_diagonal

    ma, mb = mean_off_diagonal(a), mean_off_diagonal(b)
    return abs(ma - mb) / abs(mb)


def _save_grids(path: Path, grids: dict):
    import numpy as np

    np.savez(path, **grids)


def _free(device):
    """Hand freed device memory back, so the next run's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# step: authors (full-sequence Jacobians + full SVD on a few layers, extrapolated)
# ------------------------------------------------------------------------------------------
def step_authors(ctx: Ctx):
    from coupling.model.trajectory import run_forward
    from coupling.settings.scan_settings import ScanSettings

    lm, ids, _ = build_llama(ctx)
    L, kmax = ctx.shape["layers"], max(KS)
    timed(lambda: run_forward(lm, ids), ctx.device)                   # warm-up
    fwd_s, rec = timed(lambda: run_forward(lm, ids), ctx.device)
    layers = [1, L // 2 + 1][:ctx.shape["authors_layers"]]     # the first and a middle block
    paths = {"fast": ScanSettings(k=kmax, svd="exact", jacobian="local", measures=("depth",)),
             "full": ScanSettings(k=kmax, svd="exact", jacobian="full", measures=("depth",))}
    J, S, secs = _authors_layers(ctx, lm, rec, layers, paths)
    done = [l for l in layers if ("full", l) in J]
    if not done:
        raise RuntimeError("no layer of the authors' method fitted the time budget")
    _extrapolate(ctx, secs, done, fwd_s)
    cmp = _compare_paths(J, S, done)
    write_table(ctx.out, "authors_compare", cmp,
                f"Fast path vs authors' method on layers {done} (same prompt, same SVD)")
    for r in cmp:
        ctx.log(f"compare {r['what']} layer {r['layer']}: rel diff {r['rel_diff']:.2e}")
    _real_j_svd(ctx, J[("fast", done[0])], done[0])


def _authors_layers(ctx, lm, rec, layers, paths):
    """Per path and layer: the Jacobian, its SVD and the seconds both took (fast path first;
    a full-path layer is skipped when the slowest one so far would not fit the time left)."""
    from coupling.analysis.steps import norm_kind

    kind, t = norm_kind(lm.model), rec.n_tokens - 1
    timed(lambda: _one_layer(rec, layers[0], t, paths["fast"], lm.model, kind), ctx.device)
    J, S, secs, rows = {}, {}, {"fast": {}, "full": {}}, []
    for path, s in paths.items():
        for l in layers:
            if path == "full" and secs["full"] and \
                    max(secs["full"].values()) * 1.3 + 10 > ctx.left():
                ctx.log(f"authors: layer {l} skipped (time budget)")
                continue
            sec, (jac, svd) = timed(lambda: _one_layer(rec, l, t, s, lm.model, kind), ctx.device)
            J[(path, l)], S[(path, l)], secs[path][l] = jac, svd, sec
            rows.append({"path": path, "layer": l, "seconds": sec, "what": _what(path)})
            ctx.log(f"authors: {path} layer {l}: {sec:.2f}s")
            write_table(ctx.out, "authors_layers", rows,
                        "Per-layer time (Jacobian + full SVD; fast path warmed up on one layer)")
    return J, S, secs


def _extrapolate(ctx, secs, done, fwd_s):
    L = ctx.shape["layers"]
    rows = []
    for path in ("fast", "full"):
        mean = sum(secs[path][l] for l in done) / len(done)
        rows.append({"path": path, "what": _what(path), "layers_measured": len(done),
                     "per_layer_s": mean, "forward_s": fwd_s, "L": L,
                     "total_s": fwd_s + L * mean,
                     "label": f"extrapolated from {len(done)} layer(s) to {L}"})
    rows[0]["speedup_vs_full"] = rows[1]["total_s"] / rows[0]["total_s"]
    write_table(ctx.out, "authors_extrapolated", rows,
                f"Authors' method vs fast path: EXTRAPOLATED from {len(done)} layer(s) to {L} "
                f"(n={ctx.shape['n']}, d={ctx.shape['d']}, {ctx.device})",
                "total_s = forward + L x the mean measured per-layer time (the L x L coupling "
                "products, one per layer, are not included).")


def _compare_paths(J, S, done) -> list[dict]:
    """Fast against full: the Jacobians, the singular values, the mis-coupling between layers."""
    from coupling.measures.coupling_grids import pairwise_coupling

    cmp = []
    for l in done:
        a, b = J[("fast", l)], J[("full", l)]
        cmp.append({"what": "J^l_tt", "layer": l, "rel_diff": float((a - b).norm() / b.norm()),
                    "note": "‖J_fast − J_full‖_F / ‖J_full‖_F"})
        sa, sb = S[("fast", l)].S.double(), S[("full", l)].S.double()
        cmp.append({"what": f"top-{len(sb)} singular values", "layer": l,
                    "rel_diff": float(((sa - sb).abs() / sb).max()), "note": "max relative"})
    if len(done) < 2:
        return cmp
    for k in KS:
        m = {p: pairwise_coupling([J[(p, l)] for l in done],
                                  [S[(p, l)].truncate(k).as_tuple() for l in done], k=k,
                                  variants=("normalized",))["normalized"] for p in ("fast", "full")}
        for i, li in enumerate(done):
            for j, lj in enumerate(done):
                if i != j:
                    f, r = m["fast"][i, j], m["full"][i, j]
                    cmp.append({"what": f"mis-coupling m~ K={k}", "layer": f"{li} vs {lj}",
                                "fast": f, "full": r, "rel_diff": abs(f - r) / abs(r)})
    return cmp


def _one_layer(rec, l, t, settings, model, kind):
    from coupling.analysis.steps import layer_jacobians, layer_svds

    jac = layer_jacobians(rec, [l], t, settings, model, kind)
    return jac[l], layer_svds(jac, settings)[l]


def _what(path):
    return ("authors: jacobian=full (d VJPs on the whole prompt) + full SVD" if path == "full"
            else "fast: jacobian=local (d one-token VJPs) + full SVD")


def _real_j_svd(ctx: Ctx, J, layer):
    """Dense SVD vs ARPACK on a real one-token Jacobian (its spectrum, not a random one)."""
    rows = []
    for r in svd_rows(ctx, J, f"real J^{layer}_tt of the scan model"):
        rows.append(r)
        write_table(ctx.out, "svd_real_j", rows, f"Top-K of a real J (d={J.shape[0]})",
                    _svd_note(ctx))


# ------------------------------------------------------------------------------------------
# step: svd (dense SVD on the device vs ARPACK), to settle full_svd_pays on accelerators
# ------------------------------------------------------------------------------------------
def step_svd(ctx: Ctx):
    import torch

    rows, last = [], {}
    for d in ctx.shape["svd_d"]:
        gen = torch.Generator().manual_seed(d)
        A = (torch.randn(d, d, generator=gen) / d ** 0.5).to(ctx.device)
        for r in svd_rows(ctx, A, "Gaussian / sqrt(d)", last):
            rows.append(r)
            write_table(ctx.out, "svd", rows, "Top-K of a dense d x d matrix: full SVD vs ARPACK",
                        _svd_note(ctx))
        del A
    if not rows:
        raise RuntimeError("no SVD size fitted the time budget")


def _svd_note(ctx):
    return (f"full_svd_s: torch.linalg.svd on {ctx.device} (coupling.spectrum.svd.svd_of_dense; one per d, "
            "any K). arpack_cpu_s: coupling.spectrum.svd._lanczos on the matrix on the CPU (what "
            "dense_top_k does on CPU). arpack_dev_s: the same with products on the device. "
            "rule_device / rule_cpu: what full_svd_pays(d, K, device) picks. "
            "sv_rel_diff: max relative difference of the top-K singular values. arpack_fallback: "
            "why ARPACK handed over to the dense SVD (not converged), if it did.")


def svd_rows(ctx: Ctx, A, matrix: str, last: dict | None = None):
    """Rows ``d, K, times...`` for the matrix ``A`` (on the device); skips a measurement whose
    estimate from the previous size (``last``: d^3 for the SVD, d^2 for ARPACK) does not fit."""
    import torch

    from coupling.jacobian.linop import as_operator
    from coupling.spectrum.svd import _lanczos, full_svd_pays, svd_of_dense

    last = {} if last is None else last
    d, dev = A.shape[0], ctx.device
    on_dev = torch.device(dev).type != "cpu"
    timed(lambda: svd_of_dense(A[:64, :64], 8), dev)               # solver warm-up
    full_s = _maybe(ctx, last, "full", d, 3, lambda: svd_of_dense(A, max(KS)))
    A_cpu = A.cpu()
    for k in KS:
        arp = _maybe(ctx, last, f"cpu{k}", d, 2, lambda: _lanczos(as_operator(A_cpu), k, 0))
        arp_dev = _maybe(ctx, last, f"dev{k}", d, 2, lambda: _lanczos(as_operator(A), k, 0)) \
            if on_dev else (None, None)
        times = {"full SVD": full_s[0], "ARPACK cpu": arp[0], "ARPACK device": arp_dev[0]}
        known = {m: s for m, s in times.items() if s is not None}
        diff = None
        if full_s[1] is not None and arp[1] is not None:
            ref = full_s[1].S[:k].double().cpu()
            diff = float(((arp[1].S.double().cpu() - ref).abs() / ref).max())
        row = {"matrix": matrix, "d": d, "K": k, "device": dev, "full_svd_s": full_s[0],
               "arpack_cpu_s": arp[0], "arpack_dev_s": arp_dev[0],
               "fastest": min(known, key=known.get) if known else "n/a",
               "rule_device": "full SVD" if full_svd_pays(d, k, dev) else "ARPACK",
               "rule_cpu": "full SVD" if full_svd_pays(d, k, "cpu") else "ARPACK",
               "sv_rel_diff": diff,
               "arpack_fallback": "; ".join(f for f in (_fallback(arp), _fallback(arp_dev)) if f)}
        ctx.log(f"svd {matrix} d={d} K={k}: full {_s(full_s[0])}, ARPACK cpu {_s(arp[0])}, "
                f"ARPACK device {_s(arp_dev[0])}; rule picks {row['rule_device']}; "
                f"s.v. diff {'n/a' if diff is None else f'{diff:.1e}'}")
        yield row


def _fallback(timed_result) -> str:
    """Why ARPACK handed over to the dense SVD (``SVDResult.fallback``), or ''."""
    res = timed_result[1]
    return str(getattr(res, "fallback", None) or "") if res is not None else ""


def _maybe(ctx, last, key, d, power, fn):
    """``(seconds, result)``, or ``(None, None)`` if the estimate scaled from the previous size
    does not fit the time left."""
    if key in last:
        d0, s0 = last[key]
        if s0 * (d / d0) ** power * 1.5 + 3 > ctx.left():
            ctx.log(f"  {key} at d={d} skipped: estimated {s0 * (d / d0) ** power:.1f}s")
            return None, None
    sec, out = timed(fn, ctx.device)
    last[key] = (d, sec)
    return sec, out


def _s(x):
    return "skipped" if x is None else f"{x:.3f}s"


# ------------------------------------------------------------------------------------------
# a stand-in for pytest (machines without it): what the two test files use, no more
# ------------------------------------------------------------------------------------------
def _mini_pytest_module():
    import types
    import warnings

    m = types.ModuleType("pytest")

    def fixture(fn=None, *, scope="function", params=None):
        def wrap(f):
            f._fixture = (list(params) if params is not None else None, scope)
            return f
        return wrap(fn) if fn is not None else wrap

    class Mark:
        def parametrize(self, names, values):
            def wrap(f):
                f.__dict__.setdefault("_parametrize", []).append((names, list(values)))
                return f
            return wrap

        def __getattr__(self, name):           # pytest.mark.slow etc.: no effect here
            return lambda *a, **k: (lambda f: f)

    @contextlib.contextmanager
    def raises(exc, match=None):
        try:
            yield
        except exc as e:
            if match is not None and not re.search(match, str(e)):
                raise AssertionError(f"{e!r} does not match {match!r}") from e
        else:
            raise AssertionError(f"DID NOT RAISE {exc}")

    @contextlib.contextmanager
    def warns(category, match=None):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield seen
        if not any(issubclass(w.category, category)
                   and (match is None or re.search(match, str(w.message))) for w in seen):
            raise AssertionError(f"DID NOT WARN {category.__name__} matching {match!r}")

    m.fixture, m.mark, m.raises, m.warns = fixture, Mark(), raises, warns
    return m


def _cases(fn, fixtures):
    """``[(id, kwargs)]`` for a test: its parametrize marks times its parametrized fixtures."""
    import inspect
    import itertools

    axes = []
    for names, values in reversed(fn.__dict__.get("_parametrize", [])):
        names = [x.strip() for x in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([(dict(zip(names, v if len(names) > 1 else [v])), str(v)) for v in values])
    for arg in inspect.signature(fn).parameters:
        f = fixtures.get(arg)
        if f is not None and f._fixture[0] is not None:
            axes.append([({f"@{arg}": p}, str(p)) for p in f._fixture[0]])
    out = []
    for combo in itertools.product(*axes):
        kw = {k: v for part, _ in combo for k, v in part.items()}
        out.append(("-".join(label for _, label in combo), kw))
    return out


def mini_pytest_main(argv) -> int:
    """Run the test functions of the given files without pytest; JUnit XML to ``argv[0]``,
    ``argv[1]`` a ``-k``-like filter (substrings joined by ' or ', empty: all)."""
    import inspect
    import types
    import xml.etree.ElementTree as ET

    junit, kexpr, files = argv[0], argv[1], argv[2:]
    sys.modules["pytest"] = _mini_pytest_module()
    conftest = REPO / "tests" / "conftest.py"
    if conftest.exists():
        exec(compile(conftest.read_text(), str(conftest), "exec"), {"__name__": "conftest"})
    wanted = [w.strip() for w in kexpr.split(" or ") if w.strip()]
    suite = ET.Element("testsuite", name="gpu_check-mini")
    n = fails = 0
    for path in files:
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fixtures = {k: v for k, v in vars(mod).items() if hasattr(v, "_fixture")}
        cache = {}

        def value(name, param):
            f = fixtures[name]
            key = (name, param)
            if key not in cache or f._fixture[1] == "function":
                req = types.SimpleNamespace(param=param)
                args = [req if a == "request" else value(a, None)
                        for a in inspect.signature(f).parameters]
                cache[key] = f(*args)
            return cache[key]

        for name, fn in list(vars(mod).items()):
            if not (name.startswith("test_") and callable(fn)):
                continue
            for cid, kw in _cases(fn, fixtures):
                tid = f"{Path(path).name}::{name}" + (f"[{cid}]" if cid else "")
                if wanted and not any(w in tid for w in wanted):
                    continue
                n += 1
                case = ET.SubElement(suite, "testcase", name=tid)
                t0 = time.perf_counter()
                try:
                    call = {a: kw[a] if a in kw else value(a, kw.get(f"@{a}"))
                            for a in inspect.signature(fn).parameters}
                    fn(**call)
                    print(f"PASSED {tid}", flush=True)
                except Exception:  # noqa: BLE001 - a failing test is recorded, not raised
                    fails += 1
                    ET.SubElement(case, "failure").text = traceback.format_exc()
                    print(f"FAILED {tid}\n{traceback.format_exc()}", flush=True)
                case.set("time", f"{time.perf_counter() - t0:.3f}")
    suite.set("tests", str(n))
    suite.set("failures", str(fails))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    ET.ElementTree(suite).write(junit)
    print(f"{n - fails} passed, {fails} failed (stand-in runner)")
    return 1 if fails or not n else 0


# ------------------------------------------------------------------------------------------
# the driver: each step in a subprocess with a hard limit, then summary.md
# ------------------------------------------------------------------------------------------
def run_limited(cmd, log: Path, limit: float, env=None, cwd=None) -> int | None:
    """Run ``cmd`` (its own process group) with output to ``log``; ``None`` on timeout (the
    whole group is killed, so no grandchild outlives the limit)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            fh.write(f"\n[gpu_check] killed after {limit:.0f}s (time limit)\n")
            return None


STEP_FUNCS = {"machine": step_machine, "tests": step_tests, "scan": step_scan,
              "authors": step_authors, "svd": step_svd}


def run_step(args) -> int:
    """Inside the step's subprocess."""
    ctx = _ctx(args, args.step_budget or 60)
    block_imports(_blocked(ctx))
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    STEP_FUNCS[args.run_step](ctx)
    leaked = [m for m in ALWAYS_BLOCKED if sys.modules.get(m) is not None]
    if leaked:
        raise RuntimeError(f"{leaked} got imported despite the block")
    return 0


def _ctx(args, budget) -> Ctx:
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    return Ctx(Path(args.outdir), args.device, args.smoke, args.dtype, budget, threads,
               args.tests_k, args.emulate_target, args.runner, time.perf_counter())


def check_device(device: str):
    """One-line errors for a device this machine does not have."""
    try:
        import torch
        dev = torch.device(device)
    except (RuntimeError, ImportError) as e:
        sys.exit(f"gpu_check: bad --device {device!r} ({e}): use cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: --device {device} but torch {torch.__version__} sees no CUDA GPU: "
                 "run on a GPU machine, or use --device cpu --smoke for the CPU check")
    if dev.type not in ("cuda", "cpu"):
        sys.exit(f"gpu_check: --device {device!r} is not supported: use cuda, cuda:N or cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_step:
        return run_step(args)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    check_device(args.device)
    budgets = BUDGET["smoke" if args.smoke else "full"]
    total = args.total or budgets["total"]
    t0 = time.perf_counter()
    print(f"gpu_check: steps {', '.join(args.steps)} on {args.device}"
          f"{' (smoke shapes)' if args.smoke else ''}; budget {total:.0f}s; output {out}",
          flush=True)
    results = []
    for step in args.steps:
        left = total - (time.perf_counter() - t0)
        limit = min(budgets[step], left)
        if limit < 15:
            results.append({"step": step, "status": "skipped (total budget spent)",
                            "seconds": 0.0, "limit_s": limit})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--run-step", step,
               "--step-budget", f"{limit - 3:.0f}", "--device", args.device, "--dtype", args.dtype,
               "--emulate-target" if args.emulate_target else "--no-emulate-target"]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--threads", str(args.threads)] if args.threads is not None else []
        cmd += ["--tests-k", args.tests_k] if args.tests_k else []
        cmd += ["--runner", args.runner]
        env = dict(os.environ, PYTHONPATH=_pythonpath(), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
        log = out / "logs" / f"{step}.log"
        s0 = time.perf_counter()
        rc = run_limited(cmd, log, limit, env=env, cwd=REPO)
        sec = time.perf_counter() - s0
        status = "timeout" if rc is None else "ok" if rc == 0 else f"failed (rc {rc})"
        results.append({"step": step, "status": status, "seconds": sec, "limit_s": limit,
                        "log": f"logs/{step}.log", "error": _last_error(log) if rc else ""})
        print(log.read_text(errors="replace").rstrip(), flush=True)
        print(f"== step {step}: {status} in {sec:.1f}s (limit {limit:.0f}s)", flush=True)
    wall = time.perf_counter() - t0
    write_summary(out, args, results, wall)
    print(f"gpu_check: {sum(r['status'] == 'ok' for r in results)}/{len(results)} steps ok in "
          f"{wall:.1f}s; summary in {out / 'summary.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _last_error(log: Path) -> str:
    """The last exception line of a step's log (what failed, in one line)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for ln in reversed(lines):
        if re.match(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", ln) or "killed after" in ln:
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def _load(out: Path, name: str):
    p = out / f"{name}.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def goals(out: Path) -> list[str]:
    """The issue's goals, read from the step outputs (only what was measured)."""
    lines = []
    scan = _load(out, "scan") or []
    ok50 = [r for r in scan if r.get("K") == 50 and r.get("status") == "ok"]
    if ok50:
        best = min(ok50, key=lambda r: r["seconds"])
        dflt = next((r for r in ok50 if r["svd"] == "auto"), None)
        lines.append(f"- K = 50 scan of one prompt under 10 s: best {best['seconds']:.2f} s "
                     f"(svd={best['svd']}) -> {'met' if best['seconds'] < 10 else 'NOT met'}"
                     + (f"; the default (svd=auto) {dflt['seconds']:.2f} s" if dflt else
                        "; the default (svd=auto) not run"))
    ext = _load(out, "authors_extrapolated") or []
    full = next((r for r in ext if r["path"] == "full"), None)
    if full and ok50:
        exact = next((r for r in ok50 if r["svd"] == "exact"), None) or best
        sp = full["total_s"] / exact["seconds"]
        lines.append(f"- >= 20x faster than the authors' method: {full['total_s']:.1f} s "
                     f"({full['label']}) / {exact['seconds']:.2f} s measured (svd={exact['svd']}) "
                     f"= {sp:.1f}x -> {'met' if sp >= 20 else 'NOT met'}")
    cmp = _load(out, "authors_compare") or []
    mc = [r["rel_diff"] for r in cmp if str(r.get("what", "")).startswith("mis-coupling")]
    if mc:
        lines.append(f"- coupling within 1% of exact: max relative difference fast vs authors' "
                     f"{max(mc):.2e} -> {'met' if max(mc) < 0.01 else 'NOT met'}")
    return lines or ["- nothing measured that the goals need"]


def write_summary(out: Path, args, results: list[dict], wall: float):
    machine = _load(out, "machine") or {}
    lines = ["# GPU check summary", "",
             f"Machine: {machine.get('line', 'unknown (machine step did not finish)')}", "",
             f"Command: scripts/gpu_check.sh {out} --device {args.device}"
             f"{' --smoke' if args.smoke else ''}; steps {', '.join(args.steps)}; "
             f"wall {wall:.1f} s{' (SMOKE shapes: not LLM numbers)' if args.smoke else ''}", "",
             "| step | status | seconds | limit (s) | log | error |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} "
                     f"| {r.get('log', '')} | {_cell(r.get('error', ''))} |")
    lines += ["", "## Goals (issue 14)", ""] + goals(out) + [""]
    for name in ("machine_stack", "tests", "scan", "authors_extrapolated", "authors_compare",
                 "authors_layers", "svd", "svd_real_j"):
        md = out / f"{'stack' if name == 'machine_stack' else name}.md"
        if md.exists():
            lines += [md.read_text().rstrip(), ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"steps": results, "wall_s": wall,
                                                  "machine": machine, "goals": goals(out)},
                                                 indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
