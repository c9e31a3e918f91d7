#!/usr/bin/env python3
"""End-to-end depth-wise scan of one prompt: the reference against the scan's default.

For a GPT-2-small-shaped (d=768, 12 layers) and a Llama-shaped (d=1024, GQA, 12 layers)
random-init model and one random prompt of n tokens, what ``coupling scan --measures depth``
does per prompt (``coupling.analysis.prompt.analyze_prompt``: the model forward, the L x L grids of
mis-coupling of ``J^l_{tt}`` at the last token, everything included):

* ``reference`` (the paper authors' method): ``ScanSettings(jacobian="full", svd="exact")``,
  per layer d VJPs through the block applied to the whole prompt, full SVD;
* ``default``: ``ScanSettings()`` -- one-token Jacobians (``jacobian="local"``), the exact
  top-K route ``svd="auto"`` picks; other ``--methods`` are scan ``svd`` settings.

``time / floor``: seconds over (products used x the measured cost of one product of that
kind), products = L x d for dense Jacobians.  ``--bf16`` adds the precision study (bf16
weights with float32 products against float32 weights, ``coupling.jacobian.fastpath``).

    python3 scripts/bench_scan.py                       # both shapes, K 10 50, n 64
    python3 scripts/bench_scan.py --shapes gpt2-small --k 10
    python3 scripts/bench_scan.py --bf16 --skip-reference
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import best_time, start, sync  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["gpt2-small", "llama"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[10, 50])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=["auto"],
                   help="scan svd settings for the local path (auto, exact, lanczos, randomized)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="add the bf16-weights precision study")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(shape, n_layers, n, seed, dtype=None, device="cpu"):
    import torch

    from coupling.model.loading import LoadedModel
    from coupling.model.trajectory import run_forward
    from coupling.model.zoo import build_random, shaped_config

    cfg = shaped_config(shape, n_layers=n_layers)
    model = build_random(cfg, seed=seed, dtype=dtype or torch.float32).to(device)
    lm = LoadedModel(model, None, cfg, {"n_layers": n_layers})
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    rec = run_forward(lm, ids)
    return lm, ids, rec, time.perf_counter() - t0


def scan_prompt(lm, ids, k, jacobian, svd):
    """One prompt through ``analyze_prompt`` (depth only): (seconds, PromptResult)."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.settings.scan_settings import ScanSettings

    settings = ScanSettings(k=k, svd=svd, jacobian=jacobian, measures=("depth",))
    sync()
    t0 = time.perf_counter()
    res = analyze_prompt(lm, ids, settings)
    sync()
    return time.perf_counter() - t0, res


def product_cost(rec, t, jacobian, chunk, repeats=3):
    """Seconds per product of one batch of ``chunk`` VJPs through layer 1 (warm)."""
    import torch

    from coupling.jacobian.block_jacobian import BlockJacobian
    from coupling.jacobian.fastpath import FastBlock
    from coupling.model.blocks import residual_branch

    call = rec.calls[0]
    if jacobian == "local":
        op = FastBlock(call).operator(t, t, chunk)
    else:
        op = BlockJacobian(residual_branch(call), call.input.float(), t, t, chunk)
    E = torch.eye(op.shape[0], device=call.input.device)[:, :chunk].contiguous()
    op.rmatmat(E)                                      # warm-up (first call builds the graph)
    best, _ = best_time(lambda: op.rmatmat(E), repeats)
    return best / chunk


def fast_scan(calls, k, method, t, compute_dtype=None):
    import torch

    from coupling.measures.fastpath_svd import fast_depth_coupling

    kw = {}
    if method.startswith("randomized-q"):
        method, kw = "randomized", {"n_iter": int(method.split("q")[-1])}
    out = fast_depth_coupling(calls, k, t, method, variants=("normalized",),
                              compute_dtype=compute_dtype or torch.float32, **kw)
    return out["normalized"], [s.S for s in out["svds"]]


def compare(grid, ref):
    import numpy as np

    from coupling.measures.coupling_scores import mean_off_diagonal

    m, r = mean_off_diagonal(grid), mean_off_diagonal(ref)
    off = ~np.eye(ref.shape[0], dtype=bool)
    return {"mean_m": m, "mean_m_ref": r, "rel_diff": abs(m - r) / r,
            "max_abs_entry_diff": float(np.abs(grid - ref)[off].max())}


def scan_shape(shape, args, log):
    from coupling.settings.scan_settings import DEFAULT_CHUNK

    lm, ids, rec, t_fwd = build(shape, args.layers, args.n, args.seed, device=args.device)
    L, t = rec.n_layers, args.n - 1
    d = rec.hidden_states.shape[-1]
    chunks = {"local": DEFAULT_CHUNK["one-token"], "full": DEFAULT_CHUNK["tokens"]}
    cost = {j: product_cost(rec, t, j, chunks[j]) for j in ("local", "full")}
    log(f"{shape}: d={d} L={L} n={args.n}; model forward {t_fwd:.3f}s; one product: "
        f"full prompt {cost['full'] * 1e3:.2f} ms, one token {cost['local'] * 1e3:.3f} ms "
        f"(batches of {chunks['full']} / {chunks['local']})")
    rows = []
    for k in args.k:
        ref = None
        if not args.skip_reference:
            sec, ref = scan_prompt(lm, ids, k, "full", "exact")
            rows.append(_row(shape, d, L, args.n, k, "reference", sec, ref,
                             sec / (L * d * cost["full"])))
            log(f"  K={k} reference: {sec:.2f}s per prompt, mean m~ {rows[-1]['mean_m']:.7f}, "
                f"time/floor {rows[-1]['floor_ratio']:.2f}")
        for method in args.methods:
            sec, res = best_time(lambda: scan_prompt(lm, ids, k, "local", method), args.repeats)[1]
            dense = method in ("auto", "exact")
            ratio = sec / (L * d * cost["local"]) if dense else None
            row = _row(shape, d, L, args.n, k, "default" if method == "auto" else method,
                       sec, res, ratio)
            msg = f"  K={k} {row['method']}: {sec:.2f}s per prompt, mean m~ {row['mean_m']:.7f}"
            if ratio is not None:
                msg += f", time/floor {ratio:.2f}"
            if ref is not None:
                row.update(compare(res.depth_normalized, ref.depth_normalized))
                row["speedup"] = _ref_row(rows, k)["seconds"] / sec
                msg += (f"; vs reference: mean rel diff {row['rel_diff']:.1e}, max |entry diff| "
                        f"{row['max_abs_entry_diff']:.1e}, speed-up {row['speedup']:.1f}x")
            rows.append(row)
            log(msg)
    return rows


def _ref_row(rows, k):
    return next(r for r in rows if r["k"] == k and r["method"] == "reference")


def _row(shape, d, L, n, k, method, sec, res, floor_ratio):
    return dict(shape=shape, d=d, L=L, n=n, k=k, method=method, seconds=sec,
                mean_m=res.summary["depth_mis_coupling_mean"], floor_ratio=floor_ratio,
                timings=res.timings)


def bf16_study(shape, args, log):
    """bf16 weights with float32 products (the project's default) vs float32 weights.

    Variants, all with ``fast_depth_coupling(method="auto")`` unless noted:
    fp32 weights (baseline); bf16-rounded weights run in float32 (weight rounding only);
    bf16 weights and bf16 forward, float32 products (a bf16 checkpoint as the project runs
    it); the same with bf16 products (``method="dense"``, SVD in float32).
    """
    import copy

    import numpy as np
    import torch

    from coupling.measures.coupling_scores import mean_off_diagonal
    from coupling.model.loading import LoadedModel
    from coupling.model.trajectory import run_forward

    k, t = args.k[0], args.n - 1
    lm32, ids, rec32, _ = build(shape, args.layers, args.n, args.seed)

    def record(model):
        return run_forward(LoadedModel(model, None, lm32.config, lm32.info), ids)

    rec_r = record(copy.deepcopy(lm32.model).to(torch.bfloat16).to(torch.float32))
    rec16 = record(copy.deepcopy(lm32.model).to(torch.bfloat16))
    runs = {"fp32 weights, fp32 products (baseline)": (rec32, "auto", torch.float32),
            "bf16-rounded weights, fp32 forward + products": (rec_r, "auto", torch.float32),
            "bf16 weights + bf16 forward, fp32 products": (rec16, "auto", torch.float32),
            "bf16 weights + bf16 forward, bf16 products": (rec16, "dense", torch.bfloat16)}
    results = {}
    for name, (rec, method, dtype) in runs.items():
        t0 = time.perf_counter()
        g, S = fast_scan(rec.calls, k, method, t, dtype)
        results[name] = (np.asarray(g), S, time.perf_counter() - t0)
    base_g, base_S, _ = next(iter(results.values()))
    rows = []
    for name, (g, S, sec) in results.items():
        s_err = max(float((s.double()[:k] - b.double()[:k]).abs().max() / b.double()[0])
                    for s, b in zip(S, base_S))
        cmp = compare(g, base_g)
        rows.append(dict(shape=shape, k=k, variant=name, seconds=sec, s_err=s_err,
                         mean_m=float(mean_off_diagonal(g)), rel_diff=cmp["rel_diff"],
                         max_abs_entry_diff=cmp["max_abs_entry_diff"]))
        log(f"  bf16 study {shape} K={k} {name}: {sec:.2f}s, mean m~ {rows[-1]['mean_m']:.6f} "
            f"(rel diff {cmp['rel_diff']:.1e}, max |entry diff| "
            f"{cmp['max_abs_entry_diff']:.1e}), top-K s.v. max rel err {s_err:.1e}")
    return rows


def markdown(rows):
    out = ["| shape | d | L | n | K | method | s / prompt | speed-up | time / floor | mean m̃ "
           "| rel. diff of mean | max abs diff of an entry |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup']:.1f}x" if r.get("speedup") else \
            "1x" if r["method"] == "reference" else "n/a"
        fl = f"{r['floor_ratio']:.2f}" if r.get("floor_ratio") else "n/a"
        rd = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        md = f"{r['max_abs_entry_diff']:.1e}" if "max_abs_entry_diff" in r else ""
        out.append(f"| {r['shape']} | {r['d']} | {r['L']} | {r['n']} | {r['k']} | {r['method']} "
                   f"| {r['seconds']:.2f} | {sp} | {fl} | {r['mean_m']:.7f} | {rd} | {md} |")
    return "\n".join(out)


def markdown_bf16(rows):
    out = ["| shape | K | variant | seconds | mean m̃ | rel diff of mean m̃ | max abs grid diff "
           "| top-K s.v. max rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['k']} | {r['variant']} | {r['seconds']:.2f} | "
                   f"{r['mean_m']:.6f} | {r['rel_diff']:.1e} | {r['max_abs_entry_diff']:.1e} | "
                   f"{r['s_err']:.1e} |")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    info = start("bench_scan", args.threads, args.device)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows, study = [], []
    for shape in args.shapes:
        rows += scan_shape(shape, args, log)
    if args.bf16:
        for shape in args.shapes:
            study += bf16_study(shape, args, log)
    info["loadavg_end"] = os.getloadavg()
    print()
    print(markdown(rows))
    if study:
        print()
        print(markdown_bf16(study))
    print(f"\nload average start {info['loadavg_start']} end {info['loadavg_end']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": info, "args": vars(args), "rows": rows, "bf16": study}, fh,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
