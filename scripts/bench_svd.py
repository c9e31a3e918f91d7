#!/usr/bin/env python3
"""One block Jacobian's top-K SVD: the reference (the paper authors') against the fast paths.

For each width ``d``, prompt length ``n`` and ``K``, on one random-init block (layer 2 of a
2-layer model; layer 1 is the coupling partner), in one run:

* ``reference``: d VJPs through the block applied to the WHOLE prompt (``exact_jacobians`` on
  ``residual_branch``), then ``torch.linalg.svd`` of the d x d matrix;
* ``dense``: d one-token VJPs (``coupling.jacobian.fastpath``, token copies) + full SVD;
* ``dense-lanczos``: the same dense one-token J, top-K by ARPACK on the dense matrix;
* ``lanczos``: ARPACK on the one-token operator (nothing d x d is formed);
* ``randomized-qN``: subspace iteration with N power steps on the one-token operator;
* ``dense-vmap``: d one-token VJPs under ``torch.func.vmap`` (the prefix keys/values are
  broadcast per product) + full SVD, to show what the token-copies batching buys.

Reported per method: seconds (min over repeats; each repeat rebuilds everything, including
the fast path's prefix K/V capture and its one-time check), cost in block forwards on n
tokens, peak extra resident memory, products used, ratio to the floor (products x measured
cost of one product of that kind), error of the top-K singular values and of the coupling
values against the reference.  The start, timing, memory and model helpers are
``scripts/bench_common.py`` (shared with the other benchmarks).

    python3 scripts/bench_svd.py                # default subset, a few minutes on 2 cores
    python3 scripts/bench_svd.py --full         # d 256 768 2048 x n 16 64 256 x K 10 50
    python3 scripts/bench_svd.py --d 768 --n 64 --k 10 50 --threads 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import best_time, fmt, peak_extra_memory, record_prompt  # noqa: E402
from bench_common import start, width_config  # noqa: E402

METHODS = ("reference", "dense", "dense-lanczos", "lanczos", "randomized-q4", "dense-vmap")
DEVICE = ["cpu"]   # set from --device in main()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[256, 768])
    p.add_argument("--n", type=int, nargs="+", default=[64])
    p.add_argument("--k", type=int, nargs="+", default=[10, 50])
    p.add_argument("--full", action="store_true", help="d 256 768 2048, n 16 64 256, K 10 50")
    p.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"subset of {METHODS}; randomized-qN for any N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=128, help="products per batch (all methods)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (d 4096/8192 belong there)")
    p.add_argument("--ref-budget", type=float, default=240.0,
                   help="seconds: a longer reference is timed on a few chunks and scaled")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    args = p.parse_args(argv)
    if args.full:
        args.d, args.n, args.k = [256, 768, 2048], [16, 64, 256], [10, 50]
    return args


def _rel_s(S, S_ref, k):
    return float((S[:k].double() - S_ref[:k].double()).abs().max() / S_ref[0].double())


def max_sine(A, B):
    """Largest sine of the principal angles between the column spans of A and B."""
    import torch

    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    return float(torch.linalg.matrix_norm(Qa - Qb @ (Qb.T @ Qa), ord=2))


def coupling_values(J, svd, svd_ref, J_partner, svd_partner, k):
    """Normalized mis-coupling (docs/methods.md, Eq. 14) of the block against its partner block.

    ``(J against the partner's top-K vectors, the partner against J's top-K vectors, largest
    principal-angle sine between J's top-K singular subspaces and the reference's)``.
    """
    from coupling.measures.coupling_scores import coupling_matrix, mis_coupling

    Up, _, Vp = svd_partner.as_tuple()
    U, _, V = svd.as_tuple()
    Ur, _, Vr = svd_ref.as_tuple()
    return (mis_coupling(coupling_matrix(J, Up[:, :k], Vp[:, :k]), "normalized"),
            mis_coupling(coupling_matrix(J_partner, U[:, :k], V[:, :k]), "normalized"),
            max(max_sine(U[:, :k], Ur[:, :k]), max_sine(V[:, :k], Vr[:, :k])))


def timed(fn, repeats):
    """``(result, min seconds, peak extra bytes)``: the first call also measures memory (its
    set-up, ``gc`` and ``malloc_trim``, is not timed)."""
    box = {}

    def run():
        t0 = time.perf_counter()
        out = fn()
        box["sec"] = time.perf_counter() - t0
        return out

    out, mem = peak_extra_memory(run, DEVICE[0])
    sec = box["sec"]
    if repeats > 1:
        sec = min(sec, best_time(fn, repeats - 1)[0])
    return out, sec, mem


def unit_costs(f, X, fb, chunk, ks, repeats):
    """Seconds per product: full-prompt VJP (batched), one-token VJP (batched, at chunk and
    at each batch size in ``ks``) and one-token single-vector products (ARPACK's)."""
    import torch
    from torch.func import vjp, vmap

    d, t = X.shape[-1], X.shape[1] - 1
    _, pull = vjp(f, X)
    C = torch.zeros((chunk,) + tuple(X.shape), device=X.device)
    C[torch.arange(chunk), 0, t, torch.arange(chunk) % d] = 1.0
    full = best_time(lambda: vmap(lambda c: pull(c)[0])(C), repeats)[0] / chunk
    op = fb.operator(t, t, chunk)

    def per_product(k, both):
        M = torch.randn(d, k, device=X.device)
        op.rmatmat(M)                                   # forward cached for this batch size
        back = best_time(lambda: op.rmatmat(M), repeats)[0]
        fwd = best_time(lambda: op @ M, repeats)[0] if both else back
        return (back + fwd) / 2 / k

    return {"full_vjp": full, "token_batched": per_product(chunk, False),
            "token_single": per_product(1, True),
            "token_at_k": {k: per_product(k, True) for k in ks}}


def run_config(d, n, ks, args, log):
    import torch
    from torch.func import vjp, vmap

    from coupling.jacobian.block_jacobian import BlockJacobian, exact_jacobians
    from coupling.jacobian.fastpath import FastBlock
    from coupling.measures.fastpath_svd import fast_svd
    from coupling.model.blocks import residual_branch
    from coupling.spectrum.svd import SVDResult, svd_of_dense

    cfg = width_config(args.family, d, 2)
    _, _, rec = record_prompt(cfg, n, device=args.device)
    call, partner = rec.calls[1], rec.calls[0]
    X = call.input.float()
    t = n - 1
    f = residual_branch(call)
    with torch.no_grad():
        t_fwd = best_time(lambda: f(X), 5 * args.repeats)[0]
    fb0 = FastBlock(call)
    units = unit_costs(f, X, fb0, args.chunk, [k + 10 for k in ks], args.repeats)
    log(f"d={d} n={n}: block forward {t_fwd:.4f}s; per product: full-prompt VJP "
        f"{units['full_vjp']*1e3:.2f}ms, one-token batched {units['token_batched']*1e3:.3f}ms, "
        f"one-token single {units['token_single']*1e3:.2f}ms")

    # the coupling partner (layer 1): exact dense one-token J, full SVD
    Jp = FastBlock(partner).jacobian(t, t, chunk=args.chunk)
    svd_p = svd_of_dense(Jp, max(ks))

    rows = []
    # ---- the reference: d VJPs through the block on the whole prompt + full SVD ---------
    est = units["full_vjp"] * d
    if "reference" in args.methods and est <= args.ref_budget:
        def ref():
            J = exact_jacobians(f, X, t, [t], chunk=args.chunk)[0]
            U, S, Vh = torch.linalg.svd(J, full_matrices=False)
            return J, SVDResult(U, S, Vh.T)
        (J_ref, svd_ref_full), ref_sec, ref_mem = timed(ref, args.repeats)
        ref_note = "measured"
    else:
        # accuracy baseline: the dense one-token J (equal to the reference to ~1e-7, tests)
        J_ref = fb0.jacobian(t, t, chunk=args.chunk)
        U, S, Vh = torch.linalg.svd(J_ref, full_matrices=False)
        svd_ref_full = SVDResult(U, S, Vh.T)
        ref_sec = ref_mem = None
        if "reference" in args.methods:
            # time m chunks of the sweep (every chunk costs the same) and scale to d VJPs
            m = 2
            _, pull = vjp(f, X)
            C = torch.zeros((args.chunk,) + tuple(X.shape), device=X.device)
            C[torch.arange(args.chunk), 0, t, torch.arange(args.chunk)] = 1.0
            sweep = vmap(lambda c: pull(c)[0])
            _, t_chunks, ref_mem = timed(lambda: [sweep(C) for _ in range(m)], 1)
            _, t_svd, _ = timed(lambda: torch.linalg.svd(J_ref, full_matrices=False), 1)
            ref_sec = t_chunks / (m * args.chunk) * d + t_svd
            ref_note = f"extrapolated: {m}x{args.chunk} of {d} VJPs timed"
    if ref_sec is not None:
        for k in ks:
            cv = coupling_values(J_ref, svd_ref_full.truncate(k), svd_ref_full, Jp, svd_p, k)
            rows.append(dict(d=d, n=n, k=k, method="reference", seconds=ref_sec,
                             fwd_units=ref_sec / t_fwd, peak_mb=ref_mem and ref_mem / 2**20,
                             products=d, floor_ratio=ref_sec / (d * units["full_vjp"]),
                             s_err=0.0, c_err=0.0, angle=cv[2], note=ref_note, t_fwd=t_fwd))
            log(_row_text(rows[-1]))

    # ---- ours ---------------------------------------------------------------------------
    for k in ks:
        svd_ref = svd_ref_full.truncate(k)
        c_ref = coupling_values(J_ref, svd_ref, svd_ref, Jp, svd_p, k)
        for method in args.methods:
            if method == "reference":
                continue
            if method == "dense-vmap":
                def run():
                    fb = FastBlock(call)
                    op = BlockJacobian(fb.token_function(t), X[:, t:t + 1], 0, 0,
                                       chunk=args.chunk)
                    J = op.rmatmat(torch.eye(d, device=X.device)).T
                    return svd_of_dense(J, k), J, d
                unit = None
            else:
                name, kw = method, {}
                if method.startswith("randomized-q"):
                    name, kw = "randomized", {"n_iter": int(method.split("q")[-1])}

                def run(name=name, kw=kw):
                    fb = FastBlock(call)
                    res, J = fast_svd(fb, k, t, name, chunk=args.chunk, **kw)
                    return res, J, getattr(J, "n_products", d)
                unit = {"dense": units["token_batched"], "dense-lanczos": units["token_batched"],
                        "lanczos": units["token_single"]}.get(name, units["token_at_k"][k + 10])
            (res, J, prods), sec, mem = timed(run, args.repeats)
            cv = coupling_values(J, res, svd_ref, Jp, svd_p, k)
            c_err = max(abs(cv[0] - c_ref[0]) / c_ref[0], abs(cv[1] - c_ref[1]) / c_ref[1])
            rows.append(dict(d=d, n=n, k=k, method=method, seconds=sec, fwd_units=sec / t_fwd,
                             peak_mb=mem and mem / 2**20, products=prods,
                             floor_ratio=None if unit is None else sec / (prods * unit),
                             s_err=_rel_s(res.S, svd_ref.S, k), c_err=c_err, angle=cv[2],
                             note="", t_fwd=t_fwd))
            log(_row_text(rows[-1]))
    ref_by_k = {r["k"]: r["seconds"] for r in rows if r["method"] == "reference"}
    for r in rows:
        r["speedup"] = ref_by_k[r["k"]] / r["seconds"] if r["k"] in ref_by_k else None
        r["units"] = units
    return rows


def _row_text(r):
    return (f"  d={r['d']} n={r['n']} K={r['k']} {r['method']:<14} {r['seconds']:8.3f}s "
            f"({r['fwd_units']:.0f} fwd) peak {fmt(r['peak_mb'], '.0f')}MB prods {r['products']} "
            f"floor x{fmt(r['floor_ratio'], '.2f')} s_err {r['s_err']:.1e} c_err {r['c_err']:.1e} "
            f"sin {r['angle']:.1e} {r['note']}")


def markdown(rows):
    head = ("| d | n | K | method | seconds | speed-up vs ref | cost (block fwds) | peak extra MB "
            "| products | time / floor | top-K s.v. err | coupling err | subspace sin | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['d']} | {r['n']} | {r['k']} | {r['method']} | {r['seconds']:.3f} | "
                     f"{fmt(r['speedup'], '.1f')}x | {r['fwd_units']:.0f} | "
                     f"{fmt(r['peak_mb'], '.0f')} | {r['products']} | "
                     f"{fmt(r['floor_ratio'], '.2f')} | {r['s_err']:.1e} | {r['c_err']:.1e} | "
                     f"{r['angle']:.1e} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    info = start("bench_svd", args.threads, args.device)
    DEVICE[0] = args.device
    rows = []
    for d in args.d:
        for n in args.n:
            rows += run_config(d, n, args.k, args, lambda s: print(s, flush=True))
    info["loadavg_end"] = os.getloadavg()
    print()
    print(markdown(rows))
    print(f"\nload average start {info['loadavg_start']} end {info['loadavg_end']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
