#!/usr/bin/env python3
"""GPU check: the scan on a real accelerator, at LLM width, against the authors' method.

One command, one output folder, a fixed time budget (about 8 minutes on one GPU; the smoke
mode runs the same steps on tiny shapes in under 2 minutes on a CPU).  Steps, each in its
own subprocess with a hard time limit, so one failure or overrun does not stop the rest
(this file is the driver; each step is the module named in brackets, the shared parts are
``gpu_check_common.py``):

1. ``machine`` (``gpu_check_machine.py``): the machine line (GPU, torch, CUDA,
   transformers...) and an import check of every ``coupling`` module on this stack with Ray
   made unimportable.
2. ``tests`` (``gpu_check_device_tests.py``): ``tests/test_fastpath.py`` and
   ``tests/test_blocks_jacobian.py`` on the device, models in float32 and in bf16
   (``COUPLING_TEST_DEVICE`` / ``COUPLING_TEST_DTYPE``; Jacobians are float32 either way).
   Without pytest a small stand-in (``gpu_check_standin.py``) runs the test functions
   directly.
3. ``scan`` (``gpu_check_scan.py``): a random Llama-7B-shaped model (``gpu_check_model.py``:
   32 layers, d = 4096, 32 heads, 8 KV heads, ffn 11008; bf16 weights, eager attention) and
   one prompt of 64 random token ids through ``coupling.analysis.prompt.analyze_prompt``
   (``measures=("depth",)``) at K = 10 and 50, with ``svd="auto"`` (the default) and
   ``svd="exact"``.  Each variant is first timed on one layer; a variant whose estimate does
   not fit the step's budget is reported as an estimate and not run.  Peak device memory per
   run.
4. ``authors`` (``gpu_check_authors.py``): the authors' method
   (``ScanSettings(jacobian="full", svd="exact")``: d VJPs through the block on the whole
   prompt, full SVD) on 2 layers, timed per layer and extrapolated to all layers (labelled
   so), against the fast path on the same layers (Jacobians, singular values, mis-coupling).
   Also dense SVD against ARPACK on the real Jacobian of the first of those layers.
5. ``svd`` (``gpu_check_svd.py``): dense ``torch.linalg.svd`` on the device against ARPACK on
   the dense matrix (CPU, and with products on the device) for d = 1024..8192 and K = 10, 50
   -- the measurement ``coupling.spectrum.svd.full_svd_pays`` lacks for accelerators.

6. ``stream`` (``gpu_check_stream.py``): the depth-streaming scan on the device, every block
   read from the files onto it for its turn (``--device cuda --weights disk``) against the
   model loaded whole there: time, peak device memory against the planner's prediction, and
   the grids' difference.

Outputs in OUTDIR (``gpu_check_report.py`` writes the summary): ``summary.md`` (every step's
status, time and tables, the goals), ``summary.json``, ``<step>.md/.json/.csv`` and
``logs/<step>.log``.

    scripts/gpu_check.sh OUTDIR                        # the GPU run (--device cuda)
    scripts/gpu_check.sh OUTDIR --device cpu --smoke   # tiny shapes on a CPU
    python3 scripts/gpu_check.py OUTDIR --steps scan,authors --device cpu --smoke
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from gpu_check_authors import step_authors
from gpu_check_common import ALWAYS_BLOCKED, BUDGET, REPO, STEPS, Ctx, block_imports, blocked
from gpu_check_common import pythonpath, run_limited
from gpu_check_device_tests import step_tests
from gpu_check_machine import step_machine
from gpu_check_report import write_summary
from gpu_check_scan import step_scan
from gpu_check_stream import step_stream
from gpu_check_svd import step_svd


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


STEP_FUNCS = {"machine": step_machine, "tests": step_tests, "scan": step_scan,
              "authors": step_authors, "svd": step_svd, "stream": step_stream}


def run_step(args) -> int:
    """Inside the step's subprocess."""
    ctx = _ctx(args, args.step_budget or 60)
    block_imports(blocked(ctx))
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
        env = dict(os.environ, PYTHONPATH=pythonpath(), HF_HUB_OFFLINE="1",
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


if __name__ == "__main__":
    sys.exit(main())
