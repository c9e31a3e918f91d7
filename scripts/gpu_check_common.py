"""GPU check, shared parts: the steps and their budgets, the shapes, the step context,
device timing and peak memory, the tables every step writes, the time-limited subprocess.

The steps are ``gpu_check_machine``, ``gpu_check_device_tests``, ``gpu_check_scan``,
``gpu_check_authors`` and ``gpu_check_svd``; ``gpu_check.py`` runs them (docs there).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("machine", "tests", "scan", "authors", "svd", "stream")
KS = (10, 50)
# Hard limit per step (seconds) and for the whole run; the GPU total stays about 8 minutes
# including this driver's own start.  Steps also check the clock themselves and skip work
# that would not fit, so a limit is rarely what ends a step.
BUDGET = {
    "full": {"machine": 30, "tests": 110, "scan": 140, "authors": 90, "svd": 50, "stream": 90,
             "total": 510},
    # smoke: ~80 s on an idle 2-core machine; the limits leave room for a loaded (5x) one
    "smoke": {"machine": 40, "tests": 120, "scan": 45, "authors": 35, "svd": 25, "stream": 40,
              "total": 280},
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


def blocked(ctx: Ctx) -> tuple:
    return ALWAYS_BLOCKED + (TARGET_MISSING if ctx.emulate_target else ())


def pythonpath() -> str:
    return os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])


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
        lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "/")


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
