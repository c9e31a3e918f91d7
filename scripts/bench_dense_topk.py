#!/usr/bin/env python3
"""Top-K of a dense block Jacobian: full SVD against ARPACK, and what ``svd: auto`` picks.

Once the scan has a dense ``J^l_{tt}`` (``svd: auto``, d <= 2048), its top-K triplets come
either from ``torch.linalg.svd`` of the whole matrix or from ARPACK (``svds``, ``tol=0``) on
it, in the matrix's own precision (float32; ARPACK in float64 on the same matrix beside it,
what the scan did before); both are exact to float32 round-off.  This times both on real one-token Jacobians of random-init GPT-2-style
blocks (layer 2 of 2, the last token of a random prompt of 64 tokens) and reports the
choice of :func:`coupling.spectrum.svd.full_svd_pays` next to the faster one.

    python3 scripts/bench_dense_topk.py                     # d 768 1024 2048, K 10 20 50
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import best_time, record_prompt, start, width_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[768, 1024, 2048])
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    start("bench_dense_topk", args.threads)
    from coupling.jacobian.fastpath import FastBlock
    from coupling.spectrum.svd import arpack_top_k, full_svd_pays, svd_of_dense

    rows = ["| d | K | full SVD (s) | ARPACK (s) | ARPACK in float64 (s) | faster | auto picks "
            "| max rel. s.v. diff |", "|---|---|---|---|---|---|---|---|"]
    for d in args.d:
        rec = record_prompt(width_config("gpt2", d, 2), args.n)[2]
        J = FastBlock(rec.calls[1]).jacobian(-1, -1)
        J64 = J.double()
        for k in args.k:
            t_full, full = best_time(lambda: svd_of_dense(J, k), args.repeats)
            t_arp, arp = best_time(lambda: arpack_top_k(J, k), args.repeats)
            t_64, _ = best_time(lambda: arpack_top_k(J64, k), args.repeats)
            diff = float(((full.S - arp.S).abs() / full.S).max())
            pick = "full SVD" if full_svd_pays(d, k) else "ARPACK"
            faster = "full SVD" if t_full < t_arp else "ARPACK"
            rows.append(f"| {d} | {k} | {t_full:.3f} | {t_arp:.3f} | {t_64:.3f} | {faster} "
                        f"| {pick} | {diff:.1e} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    print(f"\nload average end {os.getloadavg()}")


if __name__ == "__main__":
    main()
