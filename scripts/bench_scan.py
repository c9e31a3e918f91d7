#!/usr/bin/env python3
"""End-to-end depth-wise coupling of one prompt: the reference against the fast default.

For a GPT-2-small-shaped (d=768, 12 layers) and a Llama-shaped (d=1024, GQA, 12 layers)
random-init model and one random prompt of n tokens, the L x L grid of normalized
mis-coupling of ``J^l_{tt}`` (t = last token) for each K:

* ``reference`` (the paper authors' method): per layer, d VJPs through the block applied to
  the whole prompt (``exact_jacobians`` on ``residual_branch``), ``torch.linalg.svd``, then
  ``depth_coupling`` on the dense matrices;
* ours: ``coupling.fastpath.fast_depth_coupling`` (one-token Jacobians, ``method="auto"``
  unless ``--methods`` says otherwise), everything included (prefix K/V capture, the
  one-time check against the full prompt, Jacobians, SVDs, coupling).

The reference may be timed on the first ``--ref-layers`` layers only and scaled by
``L / ref_layers`` (its cost is the same for every layer); the agreement is then checked on
that sub-grid.  ``--bf16`` adds the precision study: bf16 weights with float32 products
against float32 weights.

    python3 scripts/bench_scan.py                       # both shapes, K 10 50, n 64
    python3 scripts/bench_scan.py --shapes gpt2-small --ref-layers 12 --k 10
    python3 scripts/bench_scan.py --bf16 --skip-reference
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_svd import best_time, machine_info, reexec_with_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["gpt2-small", "llama"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[10, 50])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ref-layers", type=int, default=4,
                   help="time the reference on this many layers and scale to all")
    p.add_argument("--methods", nargs="+", default=["auto"],
                   help="fast_svd methods (auto, dense, dense-lanczos, lanczos, randomized-qN)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="add the bf16-weights precision study")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(shape, n_layers, n, seed, dtype=None):
    import torch

    from coupling.loading import LoadedModel
    from coupling.trajectory import run_forward
    from coupling.zoo import build_random, shaped_config

    cfg = shaped_config(shape, n_layers=n_layers)
    model = build_random(cfg, seed=seed, dtype=dtype or torch.float32)
    lm = LoadedModel(model, None, cfg, {"n_layers": n_layers})
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    rec = run_forward(lm, ids)
    return lm, ids, rec, time.perf_counter() - t0


def reference_scan(calls, ks, t):
    """Per-layer dense J (full prompt) + full SVD, then the grid per K; with timings."""
    import torch

    from coupling.blocks import residual_branch
    from coupling.coupling_metrics import depth_coupling
    from coupling.jacobian import exact_jacobians

    jacs, svds, per_layer = [], [], []
    for call in calls:
        t0 = time.perf_counter()
        f = residual_branch(call)
        J = exact_jacobians(f, call.input.float(), t, [t])[0]
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        per_layer.append(time.perf_counter() - t0)
        jacs.append(J)
        svds.append((U, S, Vh.T))
    grids, t_coupling = {}, {}
    for k in ks:
        t0 = time.perf_counter()
        trips = [(U[:, :k], S[:k], V[:, :k]) for U, S, V in svds]
        grids[k] = depth_coupling(jacs, trips, k, variants=("normalized",))["normalized"]
        t_coupling[k] = time.perf_counter() - t0
    return grids, per_layer, t_coupling, [S for _, S, _ in svds]


def fast_scan(calls, k, method, t, compute_dtype=None):
    import torch

    from coupling.fastpath import fast_depth_coupling

    kw = {}
    if method.startswith("randomized-q"):
        method, kw = "randomized", {"n_iter": int(method.split("q")[-1])}
    out = fast_depth_coupling(calls, k, t, method, variants=("normalized",),
                              compute_dtype=compute_dtype or torch.float32, **kw)
    return out["normalized"], [s.S for s in out["svds"]]


def compare(grid, ref):
    import numpy as np

    from coupling.coupling_metrics import mean_off_diagonal

    m, r = mean_off_diagonal(grid), mean_off_diagonal(ref)
    off = ~np.eye(ref.shape[0], dtype=bool)
    return {"mean_m": m, "mean_m_ref": r, "rel_diff": abs(m - r) / r,
            "max_abs_entry_diff": float(np.abs(grid - ref)[off].max())}


def scan_shape(shape, args, log):
    import numpy as np

    from coupling.coupling_metrics import mean_off_diagonal

    lm, ids, rec, t_fwd = build(shape, args.layers, args.n, args.seed)
    L, t = rec.n_layers, args.n - 1
    d = rec.hidden_states.shape[-1]
    log(f"{shape}: d={d} L={L} n={args.n}; model forward {t_fwd:.3f}s")
    rows, ref = [], None
    if not args.skip_reference:
        m = min(args.ref_layers, L)
        grids, per_layer, t_coup, _ = reference_scan(rec.calls[:m], args.k, t)
        ref = {"grids": grids, "per_layer": per_layer, "layers": m, "coupling": t_coup}
        log(f"  reference: {m} layers, {np.mean(per_layer):.2f}s per layer "
            f"(min {min(per_layer):.2f}, max {max(per_layer):.2f})")
    for k in args.k:
        ref_sec = None
        if ref is not None:
            m = ref["layers"]
            # per-layer Jacobian + SVD scaled to L layers; the coupling step (L products of
            # L*K columns with dense matrices) grows as (L/m)^2 and is well under 1% of it
            ref_sec = sum(ref["per_layer"]) * L / m + ref["coupling"][k] * (L / m) ** 2
            note = ("measured on all layers" if m == L
                    else f"timed on {m} of {L} layers, scaled x{L / m:g}")
            rows.append(dict(shape=shape, d=d, L=L, n=args.n, k=k, method="reference",
                             seconds=ref_sec, note=note,
                             mean_m=float(mean_off_diagonal(ref["grids"][k]))))
            log(f"  K={k} reference {ref_sec:.1f}s per prompt ({note}); mean m~ "
                f"{rows[-1]['mean_m']:.6f} on {m} layers")
        for method in args.methods:
            t_best, (grid, _) = best_time(lambda: fast_scan(rec.calls, k, method, t), args.repeats)
            row = dict(shape=shape, d=d, L=L, n=args.n, k=k, method=method, seconds=t_best,
                       note="all layers, end to end", mean_m=float(mean_off_diagonal(grid)))
            msg = f"  K={k} {method}: {t_best:.2f}s per prompt; mean m~ {row['mean_m']:.6f}"
            if ref is not None:
                m = ref["layers"]
                row.update({"sub_" + key: v for key, v in
                            compare(grid[:m, :m], ref["grids"][k]).items()})
                row["speedup"] = ref_sec / t_best
                msg += (f"; on the {m}-layer sub-grid: mean rel diff {row['sub_rel_diff']:.1e}, "
                        f"max |entry diff| {row['sub_max_abs_entry_diff']:.1e}; "
                        f"speed-up {row['speedup']:.1f}x")
            rows.append(row)
            log(msg)
    return rows


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

    from coupling.coupling_metrics import mean_off_diagonal
    from coupling.loading import LoadedModel
    from coupling.trajectory import run_forward

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
    out = ["| shape | d | L | n | K | method | s / prompt | speed-up | mean m̃ (all L) "
           "| sub-grid mean m̃ rel diff | sub-grid max abs diff | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = (f"{r['speedup']:.1f}x" if r.get("speedup")
              else "1x" if r["method"] == "reference" else "n/a")
        rd = f"{r['sub_rel_diff']:.1e}" if "sub_rel_diff" in r else ""
        md = f"{r['sub_max_abs_entry_diff']:.1e}" if "sub_max_abs_entry_diff" in r else ""
        out.append(f"| {r['shape']} | {r['d']} | {r['L']} | {r['n']} | {r['k']} | {r['method']} "
                   f"| {r['seconds']:.2f} | {sp} | {r['mean_m']:.6f} | {rd} | {md} | {r['note']} |")
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
    reexec_with_env(args.threads)
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(f"# bench_scan  {json.dumps(info)}", flush=True)
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
