#!/usr/bin/env python3
"""Token-wise coupling of one prompt: time and peak memory of ``--measures tokens``.

A GPT-2-small-shaped random-init model (d=768, 12 heads; ``--layers`` blocks, 3 by default),
one random prompt of n tokens, token layers (1, 2): what ``coupling scan --measures tokens``
does per prompt after the forward (``coupling.analysis.prompt.analyze_prompt`` with the record
given; its ``timings["tokens"]``, and the CPU seconds of all threads, steadier on a shared
machine).  Each n runs in a fresh subprocess; the memory figure is
the rise of the resident-set high-water mark over the analysis (``peak_extra_rss``: the
kernel's mark is reset just before it starts).

``--code DIR`` imports the ``coupling`` package from ``DIR`` instead of this checkout, so an
older version can be measured side by side, e.g. the version before the token-wise work cut::

    mkdir -p /tmp/before && git archive 0bb4342 coupling | tar -x -C /tmp/before
    python3 scripts/bench_tokens.py --n 8 12 16 24 32 --code /tmp/before --save /tmp/grids-before
    python3 scripts/bench_tokens.py --n 8 12 16 24 32 64 --compare /tmp/grids-before

``--save DIR`` writes each n's three grids (``tokens-n{n}.npz``); ``--compare DIR`` reports
the largest absolute difference to grids saved earlier (same n, where there are any).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GRIDS = ("self", "fixed_input", "fixed_output")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[16, 64])
    p.add_argument("--layers", type=int, default=3,
                   help="blocks; the token layers are 1 and 2, not the last block (whose "
                        "function differs between versions with and without the final norm)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--jacobian", default="local", choices=["local", "full"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--code", help="import coupling from this folder (an older version)")
    p.add_argument("--save", help="write each n's grids to DIR/tokens-n{n}.npz")
    p.add_argument("--compare", help="max |difference| to grids saved in DIR earlier")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (steadier than wall-clock
    time on a shared machine: other jobs' load stretches the wall time, not this)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child(args) -> dict:
    """One n in this (fresh) process: build, forward, then the measured token-wise analysis."""
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    sys.path.insert(0, HERE)
    from bench_common import peak_extra_rss, start

    start("bench_tokens", args.threads)
    import numpy as np
    import torch

    import coupling
    from coupling.analysis.prompt import analyze_prompt
    from coupling.model.loading import LoadedModel
    from coupling.model.trajectory import run_forward
    from coupling.model.zoo import build_random, shaped_config
    from coupling.settings.scan_settings import ScanSettings

    (n,) = args.n
    cfg = shaped_config("gpt2-small", n_layers=args.layers)
    lm = LoadedModel(build_random(cfg, seed=args.seed), None, cfg, {"n_layers": args.layers})
    ids = torch.randint(0, cfg.vocab_size, (1, n),
                        generator=torch.Generator().manual_seed(args.seed))
    rec = run_forward(lm, ids)
    settings = ScanSettings(k=args.k, jacobian=args.jacobian, measures=("tokens",),
                            token_layers=(1, 2))
    cpu0 = _cpu_seconds()
    res, peak = peak_extra_rss(lambda: analyze_prompt(lm, ids, settings, record=rec))
    cpu = _cpu_seconds() - cpu0
    row = {"code": os.path.dirname(os.path.dirname(os.path.abspath(coupling.__file__))),
           "n": n, "d": cfg.n_embd, "k": args.k, "jacobian": args.jacobian,
           "seconds": res.timings["tokens"], "cpu_seconds": cpu, "peak_extra_gb": None if peak is None else peak / 2**30,
           "loadavg_end": os.getloadavg()}
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        np.savez(os.path.join(args.save, f"tokens-n{n}.npz"), **res.tokens)
    if args.compare and os.path.exists(os.path.join(args.compare, f"tokens-n{n}.npz")):
        old = np.load(os.path.join(args.compare, f"tokens-n{n}.npz"))
        row["max_abs_diff"] = max(float(np.nanmax(np.abs(old[g] - res.tokens[g]))) for g in GRIDS)
        row["nan_pattern_equal"] = all(bool(np.array_equal(np.isnan(old[g]), np.isnan(res.tokens[g])))
                                       for g in GRIDS)
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    for n in args.n:    # a fresh process per n: nothing left over from the previous one
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--n", str(n),
               "--layers", str(args.layers), "--k", str(args.k), "--jacobian", args.jacobian,
               "--threads", str(args.threads), "--seed", str(args.seed)]
        for flag in ("code", "save", "compare"):
            if getattr(args, flag):
                cmd += [f"--{flag}", getattr(args, flag)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("#", "RESULT"))]
        print("\n".join(lines), flush=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
