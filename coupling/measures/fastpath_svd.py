"""Top-K SVDs and depth-wise coupling straight from :class:`coupling.jacobian.fastpath.FastBlock`.

A second, minimal SVD/coupling pipeline over the fast path, used by the benchmarks
(``scripts/bench_svd.py``, ``scripts/bench_scan.py``) and tests to compare SVD methods on
one-token Jacobians.  The scan itself goes through :mod:`coupling.analysis.prompt`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from coupling.jacobian.block_jacobian import BlockJacobian
from coupling.jacobian.fastpath import FastBlock
from coupling.jacobian.token_jacobian import DENSE_CHUNK
from coupling.model.blocks import BlockCall
from coupling.spectrum.svd import SVDResult, full_svd_pays, randomized_svd, svd_of_dense, top_k_svd

SVD_METHODS = ("auto", "dense", "dense-lanczos", "lanczos", "randomized")


def resolve_svd_method(method: str, d: int, k: int, device="cpu") -> str:
    """``auto`` -> the measured fastest exact method for ``(d, K)`` (see BENCHMARKS.md):
    the full SVD of the dense one-token J below ``FULL_SVD_MAX_D`` or when K is a large
    fraction of d, ARPACK on the dense J otherwise (:func:`coupling.spectrum.svd.full_svd_pays`)."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(SVD_METHODS)}")
    if method != "auto":
        return method
    return "dense" if full_svd_pays(d, k, device) else "dense-lanczos"


def fast_svd(fb: FastBlock, k: int, t: int = -1, method: str = "auto", *,
             n_iter: int = 4, oversample: int = 10, seed: int = 0,
             chunk: int = DENSE_CHUNK) -> tuple[SVDResult, torch.Tensor | BlockJacobian]:
    """Top-``k`` triplets of ``J_{tt}`` and the Jacobian they came from (dense or operator).

    ``method``: ``dense`` (one-token dense J, full SVD), ``dense-lanczos`` (one-token dense
    J, ARPACK on the dense matrix), ``lanczos`` (ARPACK on the one-token operator; nothing
    d x d), ``randomized`` (subspace iteration, ``n_iter`` power steps; inexact), ``auto``.
    """
    method = resolve_svd_method(method, fb.d, k, fb.X.device)
    if method in ("dense", "dense-lanczos"):
        J = fb.jacobian(t, t, chunk=chunk)
        if method == "dense":
            return svd_of_dense(J, k), J
        return top_k_svd(J, k, "lanczos", seed=seed), J
    op = fb.operator(t, t, chunk)
    if method == "lanczos":
        return top_k_svd(op, k, "lanczos", seed=seed), op
    return randomized_svd(op, k, oversample=oversample, n_iter=n_iter, seed=seed), op


def fast_depth_coupling(calls: Sequence[BlockCall], k: int, t: int = -1, method: str = "auto",
                        *, final_norm=None, compute_dtype: torch.dtype = torch.float32,
                        variants=("normalized", "raw"), **svd_kw) -> dict:
    """Depth-wise coupling (L x L) of ``J^l_{tt}`` over the recorded ``calls`` (one prompt).

    ``final_norm`` (optional) is folded into the last block only (docs/methods.md, Eq. 7).
    Returns :func:`coupling.measures.coupling_grids.depth_coupling`'s dict plus ``"svds"``.
    """
    from coupling.measures.coupling_grids import depth_coupling

    jacs, svds = [], []
    for i, call in enumerate(calls):
        norm = final_norm if i == len(calls) - 1 else None
        fb = FastBlock(call, compute_dtype, norm, name=f"layer {i + 1}")
        res, J = fast_svd(fb, k, t, method, **svd_kw)
        jacs.append(J)
        svds.append(res)
    out = depth_coupling(jacs, [s.as_tuple() for s in svds], k, variants)
    out["svds"] = svds
    return out
