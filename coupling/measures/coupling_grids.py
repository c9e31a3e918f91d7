"""Coupling grids: depth-wise (layer x layer) and token-wise (token x token) (docs/methods.md,
"Coupling"; paper Eq. 10-14).

A grid repeats the coupling matrix of :mod:`coupling.measures.coupling_scores` over many operators
and references, with one batched product per operator, and scores every entry with
:func:`~coupling.measures.coupling_scores.mis_coupling`.  The single-matrix functions and the score
helpers live in :mod:`coupling.measures.coupling_scores`.

Conventions (those of :mod:`coupling.measures.coupling_scores`, plus)
-----------------------------------------------------------
* Grids: entry ``[i, j]`` of every grid here is the coupling of operator ``i`` (the row,
  "the J being coupled") against the singular vectors of reference ``j`` (the column).
  Depth-wise: ``[l, l']`` = ``J^l`` against the singular vectors of ``J^{l'}``.
* Grids and scores come back as float64 numpy arrays; ``nan`` marks entries that were not
  computed (missing operator/reference) or are undefined (see :func:`mis_coupling`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from coupling.jacobian.linop import as_operator
from coupling.measures.coupling_scores import (_NEEDS_S, _check_triplet, _check_variants,
                                               _resolve_k, _tensor, _work_dtype, mis_coupling)

__all__ = ["pairwise_coupling", "pairwise_coupling_factored", "depth_coupling",
           "depth_coupling_factored", "token_self_coupling", "token_grid_pairs",
           "context_coupling_fixed_input", "context_coupling_fixed_output"]


# ----------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------
def _finish_grid(A_grid: np.ndarray, s_rows, variants, return_matrices, k) -> dict:
    """Scores from a (Na, Nb, k, k) grid of coupling matrices (nan where not computed)."""
    out = {}
    for v in variants:
        if v in _NEEDS_S:
            S = np.full((A_grid.shape[0], k), np.nan)
            for i, s in enumerate(s_rows):
                if s is not None:
                    S[i] = np.asarray(_tensor(s).cpu(), dtype=np.float64)[:k]
            out[v] = mis_coupling(A_grid, v, s=S[:, None, :])
        else:
            out[v] = mis_coupling(A_grid, v)
        out[v] = np.asarray(out[v], dtype=np.float64).reshape(A_grid.shape[:2])
    if return_matrices:
        out["A"] = A_grid
    return out


def _check_s_rows(s_a, n_rows, variants, k):
    if not any(v in _NEEDS_S for v in variants):
        return [None] * n_rows
    if s_a is None:
        raise ValueError("the abs_l2/abs_l1 variants need s_a: the singular values of each "
                         "operator being coupled (the rows)")
    s_a = list(s_a)
    if len(s_a) != n_rows:
        raise ValueError(f"s_a has {len(s_a)} entries for {n_rows} operators")
    for i, s in enumerate(s_a):
        if s is not None and _tensor(s).shape[-1] < k:
            raise ValueError(f"s_a[{i}] holds {_tensor(s).shape[-1]} singular values, need k={k}")
    return s_a


def pairwise_coupling(ops_a: Sequence, svds_b: Sequence, k: int | None = None,
                      variants: Iterable[str] = ("normalized", "raw"), s_a=None,
                      return_matrices: bool = False, refs_per_product: int | None = None) -> dict:
    """Rectangular coupling grid: entry ``[i, j]`` = ``ops_a[i]`` against ``svds_b[j]``.

    ``ops_a``: Na operators/tensors ``(d_out, d_in)`` (``None`` -> nan row).
    ``svds_b``: Nb ``(U, S, V)`` triplets of the reference Jacobians (``None`` -> nan
    column).  ``k`` defaults to the fewest triplets any reference has.  ``s_a``: the
    singular values of each ``ops_a[i]``, needed only for the abs variants.

    Work: per operator ONE product ``J @ [V^1_k | ... | V^Nb_k]`` (``d_in x Nb k``; split
    into groups of ``refs_per_product`` references to bound memory), then Nb small
    ``U^j_k^T (.)`` blocks; an operator whose transpose products are cheaper
    (``transpose_is_cheaper``) takes ``J^T [U^1_k | ... | U^Nb_k]`` instead.  Returns ``{variant: (Na, Nb) float64}`` plus
    ``"A": (Na, Nb, k, k)`` when ``return_matrices``.
    """
    variants = _check_variants(variants)
    ops = [None if J is None else as_operator(J) for J in ops_a]
    present = [j for j, t in enumerate(svds_b) if t is not None]
    shapes = {tuple(op.shape) for op in ops if op is not None}
    if len(shapes) > 1:
        raise ValueError(f"all operators must share one shape, got {sorted(shapes)}")
    shape = shapes.pop() if shapes else None
    trips = {j: _check_triplet(svds_b[j], shape, f"svds_b[{j}]") for j in present}
    if shape is None and trips:
        t = next(iter(trips.values()))
        shape = (t[0].shape[0], t[2].shape[0])
    avail = min((t[0].shape[1] for t in trips.values()), default=k or 1)
    k = _resolve_k(k, avail, "the references")
    s_rows = _check_s_rows(s_a, len(ops), variants, k)

    dt = _work_dtype(*ops, *(x for t in trips.values() for x in t))
    A_grid = np.full((len(ops), len(svds_b), k, k), np.nan)
    if present and any(op is not None for op in ops):
        U_all = torch.stack([trips[j][0][:, :k].to(dt) for j in present])   # (P, d_out, k)
        V_cat = torch.cat([trips[j][2][:, :k].to(dt) for j in present], 1)  # (d_in, P k)
        step = len(present) if refs_per_product is None else max(1, int(refs_per_product))
        for i, op in enumerate(ops):
            if op is None:
                continue
            blocks = [_coupling_blocks(op, U_all[g:g + step], V_cat[:, g * k:(g + step) * k],
                                       k, dt) for g in range(0, len(present), step)]
            A_grid[i, present] = torch.cat(blocks).cpu().double().numpy()
    return _finish_grid(A_grid, s_rows, variants, return_matrices, k)


def _coupling_blocks(op, U_g: torch.Tensor, V_g: torch.Tensor, k: int, dt) -> torch.Tensor:
    """``U^j_k^T J V^j_k`` for one group of references, ``(g, k, k)``: ``U_g (g, d_out, k)``,
    ``V_g (d_in, g k)``.  ``J`` multiplies ``V_g``, unless its transpose products are the
    cheaper ones (``transpose_is_cheaper``: one-token and whole-prompt Jacobians, VJPs against
    a double backward or forward mode, 3-4x; ``scripts/bench_routes.py``): then
    ``J^T [U^1 .. U^g]``."""
    if not op.transpose_is_cheaper:
        JV = (op @ V_g).to(dt)                                       # (d_out, g k)
        JV = JV.reshape(JV.shape[0], -1, k).permute(1, 0, 2)         # (g, d_out, k)
        return U_g.to(JV.device).transpose(1, 2) @ JV
    U_cat = U_g.permute(1, 0, 2).reshape(U_g.shape[1], -1)           # (d_out, g k)
    JtU = op.rmatmat(U_cat).to(dt)                                   # (d_in, g k)
    JtU = JtU.reshape(JtU.shape[0], -1, k).permute(1, 0, 2)          # (g, d_in, k)
    V3 = V_g.reshape(V_g.shape[0], -1, k).permute(1, 0, 2).to(JtU.device)
    return JtU.transpose(1, 2) @ V3                                  # (g, k, k)


def pairwise_coupling_factored(svds_a: Sequence, svds_b: Sequence, k: int | None = None,
                               variants: Iterable[str] = ("normalized", "raw"),
                               return_matrices: bool = False) -> dict:
    """Like :func:`pairwise_coupling` but each ``J_i`` is replaced by its stored factors.

    ``A[i, j] = (U^j_k^T U^i) diag(S^i) (V^i^T V^j_k)`` using all r stored triplets of row
    ``i`` (see :func:`coupling_matrix_factored` for the error bound).  The abs variants use
    ``S^i`` as ``s``.
    """
    variants = _check_variants(variants)
    rows = {i: _check_triplet(t, what=f"svds_a[{i}]") for i, t in enumerate(svds_a) if t is not None}
    cols = {j: _check_triplet(t, what=f"svds_b[{j}]") for j, t in enumerate(svds_b) if t is not None}
    shapes = {(t[0].shape[0], t[2].shape[0]) for t in (*rows.values(), *cols.values())}
    if len(shapes) > 1:
        raise ValueError(f"all triplets must share one (d_out, d_in), got {sorted(shapes)}")
    k = _resolve_k(k, min((t[0].shape[1] for t in cols.values()), default=k or 1), "svds_b")
    dt = _work_dtype(*(x for t in (*rows.values(), *cols.values()) for x in t))
    A_grid = np.full((len(svds_a), len(svds_b), k, k), np.nan)
    present = sorted(cols)
    if present and rows:
        U_cat = torch.cat([cols[j][0][:, :k].to(dt) for j in present], 1)  # (d_out, P k)
        V_cat = torch.cat([cols[j][2][:, :k].to(dt) for j in present], 1)  # (d_in, P k)
        P = len(present)
        for i, (U, S, V) in rows.items():
            U, S, V = U.to(dt), S.to(dt), V.to(dt)
            left = ((U_cat.T @ U) * S).reshape(P, k, -1)                     # (P, k, r)
            right = (V.T @ V_cat).reshape(-1, P, k).permute(1, 0, 2)       # (P, r, k)
            A_grid[i, present] = (left @ right).cpu().double().numpy()
    s_rows = [rows[i][1] if i in rows else None for i in range(len(svds_a))]
    if any(v in _NEEDS_S for v in variants):
        short = [i for i, s in enumerate(s_rows) if s is not None and s.shape[0] < k]
        if short:
            raise ValueError(f"svds_a{short} hold fewer than k={k} singular values")
    return _finish_grid(A_grid, s_rows, variants, return_matrices, k)


def depth_coupling(jacobians: Sequence, svds: Sequence, k: int | None = None,
                   variants: Iterable[str] = ("normalized", "raw"),
                   return_matrices: bool = False, refs_per_product: int | None = None) -> dict:
    """Depth-wise coupling (L x L): ``[l, l']`` = ``J^l`` against the vectors of ``J^{l'}``.

    ``jacobians``: L operators/tensors (e.g. ``J^l_{tt}`` for the last token t);
    ``svds``: their L ``(U, S, V)`` triplets (``svds[l]`` belongs to ``jacobians[l]``;
    its ``S`` is the ``s`` of the abs variants).  One batched product per layer.
    Returns ``{variant: (L, L)}`` (+ ``"A": (L, L, k, k)`` when ``return_matrices``);
    the diagonal is the self-coupling, 0 up to round-off for exact SVDs.
    """
    if len(jacobians) != len(svds):
        raise ValueError(f"{len(jacobians)} Jacobians but {len(svds)} SVDs: pass one (U, S, V) "
                         "per Jacobian")
    s_a = [None if t is None else t[1] for t in svds]
    return pairwise_coupling(jacobians, svds, k, variants, s_a=s_a,
                             return_matrices=return_matrices, refs_per_product=refs_per_product)


def depth_coupling_factored(svds: Sequence, k: int | None = None,
                            variants: Iterable[str] = ("normalized", "raw"),
                            return_matrices: bool = False) -> dict:
    """:func:`depth_coupling` from the stored factors alone (no Jacobian products)."""
    return pairwise_coupling_factored(svds, svds, k, variants, return_matrices)


# ----------------------------------------------------------------------------------------
# token-wise grids (fixed layers l, l')
# ----------------------------------------------------------------------------------------
def token_self_coupling(ops_l: Sequence, svds_lp: Sequence, k: int | None = None,
                        variants: Iterable[str] = ("normalized",), s_l=None,
                        return_matrices: bool = False) -> dict:
    """Self-coupling: ``[t, t']`` = ``J^l_{tt}`` against the vectors of ``J^{l'}_{t't'}``.

    ``ops_l[t]`` = ``J^l_{tt}``, ``svds_lp[t]`` = triplets of ``J^{l'}_{tt}`` (n each;
    ``None`` -> nan row/column).  ``s_l[t]``: singular values of ``J^l_{tt}`` (abs variants).
    Returns ``{variant: (n, n)}``.
    """
    return pairwise_coupling(ops_l, svds_lp, k, variants, s_a=s_l,
                             return_matrices=return_matrices)


def token_grid_pairs(n: int, t_in: int = 0, t_out: int | None = None,
                     causal: bool = True) -> set:
    """The ``(t1, t2)`` pairs the three token-wise grids read: ``(t, t)`` (self-coupling),
    ``(t_in, t)`` (:func:`context_coupling_fixed_input` at ``t1 = t_in``) and ``(t, t_out)``
    (:func:`context_coupling_fixed_output` at ``t2 = t_out``, default the last token);
    causal: only ``t1 <= t2``.  ``3n - 3`` pairs for ``t_in = 0``, ``t_out = n - 1`` (of the
    ``n(n+1)/2`` a causal prompt has), so only these Jacobians need computing."""
    t_out = n - 1 if t_out is None else t_out
    pairs = {(t, t) for t in range(n)} | {(t_in, t) for t in range(n)} | \
        {(t, t_out) for t in range(n)}
    return {p for p in pairs if p[0] <= p[1]} if causal else pairs


def _infer_n(n, *dicts) -> int:
    if n is not None:
        return int(n)
    idx = [t for d in dicts for key in d for t in key]
    if not idx:
        raise ValueError("no (t1, t2) keys given: pass Jacobians keyed by token pairs, or n")
    return max(idx) + 1


def _check_keys(d: Mapping, name: str):
    for key in d:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"{name} must be keyed by (t1, t2) token pairs, got key {key!r}")


def context_coupling_fixed_input(ops_l: Mapping, svds_lp: Mapping, t1: int,
                                 k: int | None = None, variants: Iterable[str] = ("normalized",),
                                 n: int | None = None, causal: bool = True, s_l=None,
                                 return_matrices: bool = False) -> dict:
    """Context coupling at fixed input token ``t1``.

    ``[t2, t2']`` = ``J^l_{t1 t2}`` against the vectors of ``J^{l'}_{t1 t2'}``.
    ``ops_l[(t1, t2)]`` = ``J^l_{t1 t2}``, ``svds_lp[(t1, t2)]`` = triplets of
    ``J^{l'}_{t1 t2}``, ``s_l[(t1, t2)]`` = singular values of ``J^l_{t1 t2}`` (abs only).
    Grid is ``(n, n)`` indexed by output token; ``n`` defaults to 1 + the largest token
    index in the keys.  Entries are nan where a key is missing and, when ``causal``, where
    ``t2 < t1`` or ``t2' < t1`` (those Jacobians are zero in a causal model).
    """
    _check_keys(ops_l, "ops_l")
    _check_keys(svds_lp, "svds_lp")
    n = _infer_n(n, ops_l, svds_lp)
    ok = (lambda t: t >= t1) if causal else (lambda t: True)
    rows = [ops_l.get((t1, t)) if ok(t) else None for t in range(n)]
    cols = [svds_lp.get((t1, t)) if ok(t) else None for t in range(n)]
    s_rows = None if s_l is None else [s_l.get((t1, t)) for t in range(n)]
    return pairwise_coupling(rows, cols, k, variants, s_a=s_rows,
                             return_matrices=return_matrices)


def context_coupling_fixed_output(ops_l: Mapping, svds_lp: Mapping, t2: int,
                                  k: int | None = None, variants: Iterable[str] = ("normalized",),
                                  n: int | None = None, causal: bool = True, s_l=None,
                                  return_matrices: bool = False) -> dict:
    """Context coupling at fixed output token ``t2``.

    ``[t1, t1']`` = ``J^l_{t1 t2}`` against the vectors of ``J^{l'}_{t1' t2}``; same keys,
    ``n`` and nan rules as :func:`context_coupling_fixed_input`, with the causal rule
    ``t1, t1' <= t2``.
    """
    _check_keys(ops_l, "ops_l")
    _check_keys(svds_lp, "svds_lp")
    n = _infer_n(n, ops_l, svds_lp)
    ok = (lambda t: t <= t2) if causal else (lambda t: True)
    rows = [ops_l.get((t, t2)) if ok(t) else None for t in range(n)]
    cols = [svds_lp.get((t, t2)) if ok(t) else None for t in range(n)]
    s_rows = None if s_l is None else [s_l.get((t, t2)) for t in range(n)]
    return pairwise_coupling(rows, cols, k, variants, s_a=s_rows,
                             return_matrices=return_matrices)
