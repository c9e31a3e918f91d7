#!/usr/bin/env python3
"""Products and seconds of the two exact routes to one layer's part of the depth-wise scan.

Per block ``l`` of a random model on one random prompt of ``--n`` tokens, K = ``--k``, what the
scan needs of ``J^l_{tt}`` (last token): its top-K triplets and ``s_{K+1}``, and its row of the
L x L coupling grids (``U^{l'}_K^T J^l V^{l'}_K`` for every layer ``l'``):

* ``dense``: ``d`` one-token VJPs (batches of 128 token copies) give ``J``; its top-K by
  :func:`coupling.spectrum.svd.dense_top_k` (ARPACK on the dense matrix, or the full SVD);
  the coupling row is a dense ``d x d`` by ``d x L K`` matmul (no product);
* ``matrix-free``: ARPACK (``svds``, ``tol=0``) on the one-token operator, one vector per
  product (``J v`` by double backward, ``J^T u`` by a VJP); the coupling row takes ``L K``
  more products, ``J^T @ [U^1 .. U^L]`` (VJPs, as ``coupling.measures.coupling_grids``
  takes them; also timed as ``J @ [V^1 .. V^L]``, by double backward).

Products are counted by the operator (``TokenJacobian.n_products``).  ``--shapes`` are
``coupling.model.zoo.shaped_config`` names or ``gpt2-dD`` (GPT-2 blocks of width D);
``--layers`` blocks are built, the coupling row counts ``L = --rows-layers`` references (12,
a GPT-2-small).  The rule this measures is :func:`coupling.spectrum.svd.dense_pays`.

    python3 scripts/bench_routes.py --threads 2                 # gpt2-small and llama
    python3 scripts/bench_routes.py --shapes gpt2-small --layers 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import record_prompt, start, width_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["gpt2-small", "llama"])
    p.add_argument("--n", type=int, default=71)
    p.add_argument("--k", type=int, nargs="+", default=[10])
    p.add_argument("--layers", type=int, default=2, help="blocks built and measured")
    p.add_argument("--rows-layers", type=int, default=12, help="L of the coupling row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def one_layer(call, k: int, rows_layers: int) -> dict:
    import torch

    from coupling.jacobian.fastpath import FastBlock
    from coupling.spectrum.svd import dense_top_k, svd_of_dense, top_k_svd

    fb = FastBlock(call)
    t = fb.n - 1
    setup_s, _ = clock(lambda: fb.operator(t, t, 128))        # prefix K/V and the check
    d = fb.d
    refs = torch.linalg.qr(torch.randn(d, rows_layers * k, dtype=torch.float64))[0].float()
    # dense route
    jac_s, J = clock(lambda: fb.jacobian(t, t, chunk=128))
    topk_s, dense = clock(lambda: dense_top_k(J, k))
    row_s, _ = clock(lambda: J @ refs)
    # matrix-free route
    op = fb.operator(t, t, 128)
    op.n_products = 0
    arpack_s, free = clock(lambda: top_k_svd(op, k, "lanczos"))
    arpack_products = op.n_products
    op.n_products = 0
    mf_row_s, _ = clock(lambda: op.rmatmat(refs))
    row_products = op.n_products
    mf_row_j_s, _ = clock(lambda: op @ refs)
    exact = svd_of_dense(J.double(), k)
    err = lambda s: float((s.S.double() - exact.S).abs().max() / exact.S[0])  # noqa: E731
    return {"d": d, "setup_s": setup_s,
            "dense": {"products": d, "jacobian_s": jac_s, "top_k_s": topk_s, "row_s": row_s,
                      "seconds": jac_s + topk_s + row_s, "sv_err": err(dense)},
            "matrix_free": {"products": arpack_products + row_products,
                            "arpack_products": arpack_products, "row_products": row_products,
                            "arpack_s": arpack_s, "row_s": mf_row_s,
                            "row_by_j_s": mf_row_j_s, "seconds": arpack_s + mf_row_s,
                            "sv_err": err(free)},
            "gap": exact.gap}


def config_of(shape: str, n_layers: int):
    """A ``shaped_config`` name, or ``gpt2-dD``: GPT-2 blocks of width D (64-dim heads)."""
    from coupling.model.zoo import shaped_config

    if shape.startswith("gpt2-d"):
        return width_config("gpt2", int(shape.removeprefix("gpt2-d")), n_layers)
    return shaped_config(shape, n_layers=n_layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = start("bench_routes", args.threads)
    rows = []
    for shape in args.shapes:
        rec = record_prompt(config_of(shape, args.layers), args.n)[2]
        for k in args.k:
            for l in range(1, args.layers + 1):
                r = one_layer(rec.call(l), k, args.rows_layers)
                r.update(shape=shape, layer=l, k=k)
                rows.append(r)
                dn, mf = r["dense"], r["matrix_free"]
                print(f"{shape} d={r['d']} K={k} layer {l} (gap {r['gap']:.4f}): dense "
                      f"{dn['products']} products {dn['seconds']:.2f} s (J {dn['jacobian_s']:.2f}, "
                      f"top-K {dn['top_k_s']:.3f}, row {dn['row_s']:.3f}); matrix-free "
                      f"{mf['products']} products ({mf['arpack_products']} ARPACK + "
                      f"{mf['row_products']} row) {mf['seconds']:.2f} s (ARPACK "
                      f"{mf['arpack_s']:.2f}, row {mf['row_s']:.2f}, row by J products "
                      f"{mf['row_by_j_s']:.2f}); setup {r['setup_s']:.3f} s; s.v. err "
                      f"{dn['sv_err']:.1e} / {mf['sv_err']:.1e}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    print(json.dumps(info))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": info, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
