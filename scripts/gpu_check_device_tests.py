"""GPU check, step ``tests``: the fast-path and block-replay test files on the device, models
in float32 and in bf16, each run in its own time-limited process with Ray unimportable
(pytest, or the stand-in runner of ``gpu_check_standin`` where pytest is absent)."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from gpu_check_common import REPO, Ctx, blocked, pythonpath, run_limited, write_table

TEST_FILES = ("tests/test_fastpath.py", "tests/test_blocks_jacobian.py")
# The start of a test process: the comma list in argv[1] made unimportable (block_imports).
BLOCK_CODE = "import sys; [sys.modules.__setitem__(m, None) for m in sys.argv[1].split(',')]; "


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
                   PYTHONPATH=pythonpath())
        junit = ctx.out / f"tests_{dtype}.xml"
        args = [str(REPO / f) for f in TEST_FILES]
        if have_pytest:
            cmd = ["-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
            cmd += ["-k", ctx.tests_k] if ctx.tests_k else []
            code = BLOCK_CODE + "import pytest; sys.exit(pytest.main(sys.argv[2:]))"
        else:
            cmd = [str(junit), ctx.tests_k or "", *args]
            code = (BLOCK_CODE + f"sys.path.insert(0, {str(REPO / 'scripts')!r}); "
                    "import gpu_check_standin; "
                    "sys.exit(gpu_check_standin.mini_pytest_main(sys.argv[2:]))")
        full = [sys.executable, "-c", code, ",".join(blocked(ctx)), *cmd]
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
