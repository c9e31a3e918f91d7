#!/usr/bin/env python3
"""The whole ``coupling scan`` process against the paper authors' method, side by side.

One prompt of ``--n`` tokens (71 by default), a random GPT-2-small-shaped model (12 layers,
d = 768) saved with ``save_pretrained`` (with the embedded model's tokenizer), K = 10. Each
row is one fresh process, timed from start to exit, everything included (imports, model
load, the scan, writing the output, figures unless ``--no-figures``):

* ``default``: ``coupling scan`` as a user runs it (one-token Jacobians, ``--svd auto``);
* ``authors``: ``coupling scan --jacobian full --svd exact``, the authors' method (every
  block's Jacobian from d products through the block on the whole prompt, full SVD).

Coupling agreement: the relative difference of the mean normalized mis-coupling and the
largest entry difference of the L x L grids of the two runs.  Also the time of
``coupling --help`` and of an argument error.

    python3 scripts/bench_process.py                  # ~3 min on 2 CPU cores
    python3 scripts/bench_process.py --threads 2 --repeats 2 --out bench_process.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=71, help="prompt tokens")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of the default (best kept)")
    p.add_argument("--skip-authors", action="store_true")
    p.add_argument("--work", default=None, help="folder for the model and outputs (temporary)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_inputs(work: Path, n: int, layers: int) -> tuple[Path, Path]:
    """The saved random model and a one-prompt JSONL file of exactly ``n`` tokens."""
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.zoo import save_random, shaped_config

    model_dir = work / "gpt2-small-random"
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    if not (model_dir / "config.json").exists():
        save_random(shaped_config("gpt2-small", n_layers=layers), model_dir, seed=0,
                    tokenizer=tok)
    words = ("The capital of France is Paris, and the capital of Italy is Rome; "
             "rivers run to the sea while the mountains stand still. ") * 8
    ids = tok(words)["input_ids"][:n]
    text = tok.decode(ids)
    assert len(tok(text)["input_ids"]) == n, "the prompt does not round-trip to n tokens"
    prompts = work / "prompt.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "text": text}) + "\n")
    return model_dir, prompts


def coupling_cmd() -> list:
    exe = Path(sys.executable).parent / "coupling"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "coupling.cli"]


def timed(cmd: list, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def scan_once(args, model_dir, prompts, out: Path, env, extra=()) -> tuple[float, str]:
    cmd = coupling_cmd() + ["scan", "--model", str(model_dir), "--prompts", str(prompts),
                            "--k", str(args.k), "--measures", "depth,regularity",
                            "--threads", str(args.threads), "--out", str(out), "--overwrite",
                            *extra]
    seconds, proc = timed(cmd, env)
    if proc.returncode != 0:
        sys.exit(f"bench_process: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def grids(out: Path):
    import numpy as np

    with np.load(out / "depth_coupling.npz") as z:
        return z["normalized"][0]


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-process-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    model_dir, prompts = make_inputs(work, args.n, args.layers)
    rows = {}
    help_s = min(timed(coupling_cmd() + ["--help"], env)[0] for _ in range(3))
    err_s = min(timed(coupling_cmd() + ["scan", "--k", "x"], env)[0] for _ in range(3))
    best = None
    for _ in range(args.repeats):
        s, stdout = scan_once(args, model_dir, prompts, work / "default", env)
        best = s if best is None else min(best, s)
    rows["default"] = {"seconds": best, "stdout": stdout}
    s, stdout = scan_once(args, model_dir, prompts, work / "default-nofig", env,
                          ["--no-figures"])
    rows["default --no-figures"] = {"seconds": s, "stdout": stdout}
    if not args.skip_authors:
        s, stdout = scan_once(args, model_dir, prompts, work / "authors", env,
                              ["--jacobian", "full", "--svd", "exact"])
        rows["authors"] = {"seconds": s, "stdout": stdout}
    import numpy as np
    import torch
    import transformers

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}, transformers {transformers.__version__}, "
                         f"{args.threads} threads",
              "n_tokens": args.n, "k": args.k, "layers": args.layers,
              "help_s": help_s, "arg_error_s": err_s,
              "runs": {k: v["seconds"] for k, v in rows.items()}}
    print(f"machine: {result['machine']}")
    print(f"coupling --help {help_s:.2f} s, argument error {err_s:.2f} s")
    print("| process | seconds | speed-up vs authors |")
    print("|---|---|---|")
    ref = rows.get("authors", {}).get("seconds")
    for name, row in rows.items():
        speed = f"{ref / row['seconds']:.1f}x" if ref else ""
        print(f"| `{name}` | {row['seconds']:.1f} | {speed} |")
    if ref:
        a, b = grids(work / "default"), grids(work / "authors")
        off = ~np.eye(a.shape[0], dtype=bool)
        rel = abs(a[off].mean() - b[off].mean()) / b[off].mean()
        result.update(mean_mis_coupling_rel_diff=float(rel),
                      max_entry_diff=float(np.abs(a - b).max()),
                      speedup=ref / rows["default"]["seconds"])
        print(f"mean m~ relative difference {rel:.1e}; largest grid entry difference "
              f"{np.abs(a - b).max():.1e}")
    print("--- default run's summary ---")
    print(rows["default"]["stdout"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
