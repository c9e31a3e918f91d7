#!/usr/bin/env python3
"""The whole ``coupling scan`` process against the paper authors' method, side by side.

``--prompts`` prompts (4 by default) of exactly ``--n`` tokens (71), a random
GPT-2-small-shaped model (12 layers, d = 768) saved with ``save_pretrained`` (with the
embedded model's tokenizer), K = 10, ``--measures depth,regularity``.  Each row is one fresh
process, timed from start to exit, everything included (imports, model load, the scan,
writing the output):

* ``default``: ``coupling scan`` as a user runs it (one-token Jacobians, ``--svd auto``,
  figures drawn by a detached process after the summary, ``coupling.figures.background``);
* ``default --no-figures``;
* ``authors``: ``coupling scan --jacobian full --svd exact``, the authors' method (every
  block's Jacobian from d products through the block on the whole prompt, full SVD).

Runs are interleaved (default, no-figures, authors, default, ...; ``--authors-repeats``
of the slow one) and the best of each kind is kept.  After a default run the script waits
for its figures (``figures/summary.txt``) before the next run starts, so the detached
drawing never slows a timed process, and reports how long they took to appear.

Times are wall-clock and CPU seconds (user + system of the process; the detached drawing
is not counted): on a shared machine the CPU seconds are the steadier measure.  Per prompt:
``analysis_s`` and ``analysis_cpu_s`` of the manifest (forward, Jacobians, SVDs, coupling,
regularity) over the prompts.  ``--authors-prompts P`` runs the authors' method on the first
P prompts only (it is ~20x slower), the default on those P beside it, and extrapolates the
authors' method to all prompts (its process + the rest times its measured per-prompt time).
``time / floor`` (``--skip-floor`` leaves it out; ``--floor-only``: nothing else): in this
process, per prompt, each part of ``analyze_prompt``'s default against L x d x the measured
cost of one one-token product (a warm batch of 128 VJPs through layer 1); the authors'
per-prompt time against L x d x one whole-prompt product (a warm batch of 64).

Coupling agreement: the relative difference of the mean normalized mis-coupling and the
largest entry difference of the L x L grids of the two runs, over all prompts.

    python3 scripts/bench_process.py                     # ~15 min on 2 quiet CPU cores
    python3 scripts/bench_process.py --threads 1 --authors-prompts 1 --baseline OLD_CHECKOUT
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine_info, reexec_with_env  # noqa: E402

TEXTS = ("The capital of France is Paris, and the capital of Italy is Rome; rivers run to "
         "the sea while the mountains stand still. ",
         "A small bird sat on the branch of an old oak tree and sang about the morning sun "
         "and the cold wind from the north. ",
         "In the year of the great flood the people of the valley built boats from the wood "
         "of their houses and sailed to the hills. ",
         "Numbers grow when you add one to them, and the sum of two even numbers is always "
         "even, as every child learns at school. ")
FIGURES_WAIT_S = 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=71, help="tokens per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of the default (best kept)")
    p.add_argument("--authors-repeats", type=int, default=1)
    p.add_argument("--authors-prompts", type=int, default=None, metavar="P",
                   help="the authors' method on the first P prompts only (it is ~20x slower), "
                        "with the default on the same P beside it; its time on all prompts is "
                        "then extrapolated: its P-prompt process + its measured CPU per prompt")
    p.add_argument("--skip-authors", action="store_true")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--floor-only", action="store_true", help="only the time / floor table")
    p.add_argument("--baseline", default=None, metavar="SRC",
                   help="also time the default of the coupling package in SRC (a checkout "
                        "of an earlier commit), as the row 'baseline'")
    p.add_argument("--work", default=None, help="folder for the model and outputs (temporary)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_inputs(work: Path, n: int, layers: int, n_prompts: int) -> tuple[Path, Path]:
    """The saved random model and a JSONL file of ``n_prompts`` prompts of exactly ``n`` tokens."""
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.zoo import save_random, shaped_config

    model_dir = work / "gpt2-small-random"
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    if not (model_dir / "config.json").exists():
        save_random(shaped_config("gpt2-small", n_layers=layers), model_dir, seed=0,
                    tokenizer=tok)
    lines = []
    for i in range(n_prompts):
        ids = tok(TEXTS[i % len(TEXTS)] * 8)["input_ids"][i // len(TEXTS):][:n]
        text = tok.decode(ids)
        assert len(tok(text)["input_ids"]) == n, "a prompt does not round-trip to n tokens"
        lines.append(json.dumps({"id": f"p{i}", "text": text}))
    prompts = work / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    return model_dir, prompts


def coupling_cmd() -> list:
    exe = Path(sys.executable).parent / "coupling"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "coupling.cli"]


def timed(cmd: list, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def cpu_seconds() -> float:
    """User + system CPU seconds of the waited-for children so far (the detached figure
    drawing is not waited for, so it is not counted)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def scan_once(args, model_dir, prompts, out: Path, env, extra=()) -> dict:
    cmd = [sys.executable, "-m", "coupling.cli", "scan", "--model", str(model_dir),
           "--prompts", str(prompts),
                            "--k", str(args.k), "--measures", "depth,regularity",
                            "--threads", str(args.threads), "--out", str(out), "--overwrite",
                            *extra]
    cpu0 = cpu_seconds()
    seconds, proc = timed(cmd, env)
    t_exit = time.perf_counter()
    if proc.returncode != 0:
        sys.exit(f"bench_process: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    row = {"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "stdout": proc.stdout,
           **json.loads((out / "manifest.json").read_text())["timings"]}
    if "--no-figures" not in extra:
        row["figures_after_exit_s"] = wait_for_figures(out, t_exit)
    return row


def wait_for_figures(out: Path, since: float) -> float | None:
    """Seconds from the scan's exit until its detached drawing wrote ``summary.txt``."""
    target = out / "figures" / "summary.txt"
    while time.perf_counter() - since < FIGURES_WAIT_S:
        if target.exists():
            return time.perf_counter() - since
        if (out / "figures" / "errors.txt").exists():
            sys.exit(f"bench_process: drawing the figures failed: "
                     f"{(out / 'figures' / 'errors.txt').read_text()}")
        time.sleep(0.05)
    sys.exit(f"bench_process: no figures in {out} {FIGURES_WAIT_S} s after the scan")


def run_all(args, model_dir, prompts, work, env) -> dict:
    """Interleaved runs; the best (fastest) of each kind, with every time kept."""
    kinds = {"default": [], "default --no-figures": [], "authors": []}
    extra = {"default": [], "default --no-figures": ["--no-figures"],
             "authors": ["--jacobian", "full", "--svd", "exact"]}
    envs = dict.fromkeys(kinds, env)
    sources = dict.fromkeys(kinds, prompts)
    if args.authors_prompts and args.authors_prompts < args.prompts:
        few = work / "prompts-authors.jsonl"
        few.write_text("".join(prompts.read_text().splitlines(True)[:args.authors_prompts]))
        kinds = {"default": [], "authors": [], "default, authors' prompts": [],
                 "default --no-figures": []}
        extra["default, authors' prompts"] = []
        envs = dict.fromkeys(kinds, env)
        sources = {**dict.fromkeys(kinds, prompts), "authors": few,
                   "default, authors' prompts": few}
    if args.baseline:
        kinds["baseline"], extra["baseline"] = [], []
        envs["baseline"] = {**env, "PYTHONPATH": str(Path(args.baseline).resolve())}
    for r in range(args.repeats):
        for kind in kinds:
            if kind == "authors" and (args.skip_authors or r >= args.authors_repeats):
                continue
            if kind == "default, authors' prompts" and r >= args.authors_repeats:
                continue
            out = work / kind.replace(" ", "_")
            shutil.rmtree(out / "figures", ignore_errors=True)   # wait for this run's own
            row = scan_once(args, model_dir, sources.get(kind, prompts), out, envs[kind],
                            extra[kind])
            kinds[kind].append(row)
            print(f"  run {r + 1} {kind}: {row['seconds']:.1f} s wall, {row['cpu_s']:.1f} s CPU "
                  f"(analysis {row['analysis_s']:.1f} s wall)", flush=True)
    return {k: min(v, key=lambda row: row["seconds"]) | {"all_seconds": [x["seconds"] for x in v],
                                                         "all_cpu_s": [x["cpu_s"] for x in v],
                                                         "cpu_s": min(x["cpu_s"] for x in v)}
            for k, v in kinds.items() if v}


def grids(out: Path):
    import numpy as np

    with np.load(out / "depth_coupling.npz") as z:
        return z["normalized"]


def agreement(work: Path) -> dict:
    import numpy as np

    a, b = grids(work / "default"), grids(work / "authors")
    a = a[:len(b)]                         # the authors' method may have run on fewer prompts
    off = ~np.eye(a.shape[-1], dtype=bool)
    ma, mb = a[:, off].mean(), b[:, off].mean()
    per_prompt = np.abs(a[:, off].mean(1) - b[:, off].mean(1)) / b[:, off].mean(1)
    return {"mean_mis_coupling_rel_diff": float(abs(ma - mb) / mb),
            "per_prompt_mean_rel_diff_max": float(per_prompt.max()),
            "max_entry_diff": float(np.abs(a - b)[:, off].max())}


def floor_table(args, model_dir, prompts) -> dict:
    """Per-prompt parts of the default analysis, and the products' floor, in this process."""
    import torch

    from coupling.analysis.prompt import analyze_prompt
    from coupling.jacobian.block_jacobian import BlockJacobian
    from coupling.jacobian.fastpath import FastBlock
    from coupling.model.blocks import residual_branch
    from coupling.model.loading import load_model
    from coupling.model.trajectory import run_forward
    from coupling.prompts.sources import load_prompts
    from coupling.scan import tokenize_all
    from coupling.settings.scan_settings import ScanSettings

    torch.set_num_threads(args.threads)
    lm = load_model(str(model_dir))
    ids = tokenize_all(lm, load_prompts(str(prompts), None, 0), None)
    settings = ScanSettings(k=args.k, measures=("depth", "regularity"))
    depth_only = ScanSettings(k=args.k, measures=("depth",))
    analyze_prompt(lm, ids[0], settings)                   # warm-up
    parts, cpu = [], {"depth": [], "all": []}
    for x in ids:       # CPU seconds too: on a shared machine they say more than the clock
        for name, s in (("depth", depth_only), ("all", settings)):
            c0 = time.process_time()
            timings = analyze_prompt(lm, x, s).timings
            cpu[name].append(time.process_time() - c0)
        parts.append(timings)
    rec = run_forward(lm, ids[0])
    t = rec.n_tokens - 1
    call = rec.calls[0]
    costs = {}
    for kind, op, chunk in (("one-token", FastBlock(call).operator(t, t, 128), 128),
                            ("whole-prompt", BlockJacobian(residual_branch(call),
                                                           call.input.float(), t, t, 64), 64)):
        E = torch.eye(op.shape[0])[:, :chunk].contiguous()
        op.rmatmat(E)
        best, best_cpu = float("inf"), float("inf")
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            op.rmatmat(E)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        costs[kind] = best / chunk
        costs[kind + " cpu"] = best_cpu / chunk
    L, d = rec.n_layers, rec.hidden_states.shape[-1]
    floor = L * d * costs["one-token"]
    mean = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    floor_cpu = L * d * costs["one-token cpu"]
    return {"product_s": costs, "floor_s": floor, "floor_whole_prompt_s": L * d *
            costs["whole-prompt"], "floor_cpu_s": floor_cpu,
            "floor_whole_prompt_cpu_s": L * d * costs["whole-prompt cpu"],
            "cpu_per_prompt_s": {k: sum(v) / len(v) for k, v in cpu.items()},
            "forward_depth_cpu_over_floor": sum(cpu["depth"]) / len(cpu["depth"]) / floor_cpu,
            "all_cpu_over_floor": sum(cpu["all"]) / len(cpu["all"]) / floor_cpu,
            "parts_s": mean,
            "depth_over_floor": mean["depth"] / floor,
            "forward_depth_over_floor": (mean["forward"] + mean["depth"]) / floor,
            "all_over_floor": sum(mean.values()) / floor}


FEW = ("authors", "default, authors' prompts")     # the rows run on the authors' P prompts


def authors_reference(result: dict, rows: dict) -> dict | None:
    """The authors' whole process on ALL the prompts: measured, or, when it ran on the first
    P only, extrapolated (its P-prompt process + the other prompts x its per-prompt time)."""
    ref = rows.get("authors")
    if not ref:
        return None
    if "default, authors' prompts" not in rows:
        return {"seconds": ref["seconds"], "cpu_s": ref["cpu_s"], "extrapolated": False}
    extra = result["prompts"] - result["authors_prompts"]
    est = {"seconds": ref["seconds"] + extra * ref["per_prompt_s"],
           "cpu_s": ref["cpu_s"] + extra * ref["per_prompt_cpu_s"], "extrapolated": True}
    result["authors_all_prompts_estimate"] = {"wall_s": est["seconds"], "cpu_s": est["cpu_s"]}
    return est


def report(result: dict, rows: dict):
    """A whole process is compared with the authors' process on the same prompts: the measured
    one for the rows run on the authors' P prompts, the extrapolated one (marked ``e``) for
    the rows run on all of them."""
    print(f"machine: {json.dumps(result['machine'])}")
    print("| process | prompts | wall s (best) | all runs | CPU s (best) | all runs | analysis "
          "wall s / prompt | CPU s / prompt | speed-up, whole process, wall | ... CPU | "
          "speed-up per prompt, wall | ... CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref, est = rows.get("authors"), authors_reference(result, rows)
    for name, row in rows.items():
        few = name in FEW and est and est["extrapolated"]
        base = ref if few or not est else est
        mark = "" if few or not (est and est["extrapolated"]) else " e"
        whole = f"{base['seconds'] / row['seconds']:.1f}x{mark}" if ref else ""
        cpu = f"{base['cpu_s'] / row['cpu_s']:.1f}x{mark}" if ref else ""
        per = f"{ref['per_prompt_s'] / row['per_prompt_s']:.1f}x" if ref else ""
        pc = row.get("per_prompt_cpu_s")
        per_cpu = f"{ref['per_prompt_cpu_s'] / pc:.1f}x" if ref and pc else ""
        runs = ", ".join(f"{s:.1f}" for s in row["all_seconds"])
        cpus = ", ".join(f"{s:.1f}" for s in row["all_cpu_s"])
        n = result["authors_prompts"] if name in FEW else result["prompts"]
        print(f"| `{name}` | {n} | {row['seconds']:.1f} | {runs} | {row['cpu_s']:.1f} | {cpus} | "
              f"{row['per_prompt_s']:.2f} | {pc or float('nan'):.2f} | {whole} | {cpu} | {per} | "
              f"{per_cpu} |")
    if est and est["extrapolated"]:
        print(f"e: against the authors' method on all {result['prompts']} prompts, EXTRAPOLATED "
              f"from its run on {result['authors_prompts']}: {est['seconds']:.0f} s wall, "
              f"{est['cpu_s']:.0f} s CPU")
    for name, row in rows.items():
        if row.get("figures_after_exit_s") is not None:
            print(f"{name}: figures written {row['figures_after_exit_s']:.1f} s after the exit")
    if "agreement" in result:
        a = result["agreement"]
        print(f"mean m~ relative difference {a['mean_mis_coupling_rel_diff']:.1e} (largest per "
              f"prompt {a['per_prompt_mean_rel_diff_max']:.1e}); largest grid entry difference "
              f"{a['max_entry_diff']:.1e}")
    if "floor" in result:
        f = result["floor"]
        print(f"one product: one-token {f['product_s']['one-token'] * 1e3:.3f} ms, whole prompt "
              f"{f['product_s']['whole-prompt'] * 1e3:.2f} ms; floor per prompt "
              f"{f['floor_s']:.2f} s (one-token), {f['floor_whole_prompt_s']:.1f} s (whole)")
        print("per prompt: " + ", ".join(f"{k} {v:.2f} s" for k, v in f["parts_s"].items()))
        print(f"time / floor: depth {f['depth_over_floor']:.2f}, forward + depth "
              f"{f['forward_depth_over_floor']:.2f}, everything {f['all_over_floor']:.2f}; "
              f"in CPU seconds: forward + depth {f['forward_depth_cpu_over_floor']:.2f}, "
              f"everything {f['all_cpu_over_floor']:.2f}")
        if ref:
            print(f"authors' time / floor (per prompt, whole-prompt products): "
                  f"{ref['per_prompt_s'] / f['floor_whole_prompt_s']:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    reexec_with_env(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-process-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    model_dir, prompts = make_inputs(work, args.n, args.layers, args.prompts)
    machine = machine_info(args.threads)
    if args.floor_only:
        floor = floor_table(args, model_dir, prompts)
        print(json.dumps({"machine": machine | {"loadavg_end": os.getloadavg()},
                          "floor": floor}, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": machine, "floor": floor}, indent=2))
        return 0
    help_s = min(timed(coupling_cmd() + ["--help"], env)[0] for _ in range(3))
    rows = run_all(args, model_dir, prompts, work, env)
    result = {"machine": machine, "n_tokens": args.n, "prompts": args.prompts, "k": args.k,
              "authors_prompts": args.authors_prompts or args.prompts,
              "layers": args.layers, "help_s": help_s,
              "runs": {k: {x: v for x, v in row.items() if x != "stdout"}
                       for k, row in rows.items()}}
    if "authors" in rows:
        result["agreement"] = agreement(work)
    if not args.skip_floor:
        result["floor"] = floor_table(args, model_dir, prompts)
    result["machine"]["loadavg_end"] = os.getloadavg()
    report(result, rows)
    print("--- default run's summary ---")
    print(rows["default"]["stdout"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
