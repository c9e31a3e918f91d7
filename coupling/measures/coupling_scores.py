"""Single coupling matrices and mis-coupling scores (docs/methods.md, "Coupling"; paper Eq. 10-14).

What one pair of Jacobians gives: the coupling matrix of ``J`` against the singular vectors
of a reference ``J'``, and the scores that say how far it is from diagonal.  The grids that
repeat this over layers and tokens are in :mod:`coupling.measures.coupling_grids`; the argument
checks here (triplets, ``k``, variants, working dtype) are shared with them.

Conventions
-----------
* A block Jacobian ``J`` is ``(d_out, d_in)``: a dense ``torch.Tensor`` or any
  :class:`~coupling.jacobian.linop.LinearOperator` (only products ``J @ M`` are used here).
* Singular triplets are ``(U, S, V)`` with ``U (d_out, K)``, ``S (K,)`` descending,
  ``V (d_in, K)`` (columns are singular vectors), so ``J ~= U diag(S) V^T``.
* The **coupling matrix of J against J'** (``J' = U' S' V'^T``) is
  ``A_K = U'_K^T J V'_K`` (K x K).  Aligned singular vectors make it diagonal.
* Arithmetic is float32, or float64 when any input is float64.  Scores come back as
  float64 (a float, or a numpy array over leading axes); ``nan`` marks undefined scores
  (see :func:`mis_coupling`).

Mis-coupling variants (:func:`mis_coupling`)
--------------------------------------------
``"raw"``        ``||A - Diag(A)||_F``                      (Eq. 13)
``"normalized"`` ``||A - Diag(A)||_F / ||A||_F`` in [0, 1]    (Eq. 14, used for Fig. 1b)
``"abs_l2"``     ``|| |A| - diag(s) ||_F / ||s||_2``           (authors' released code)
``"abs_l1"``     ``|| |A| - diag(s) ||_F / sum(s)``            (authors' released code)
where ``s`` are the top-K singular values of the J being coupled (the row operator).
Lower is more strongly coupled; J against itself gives 0 under every variant.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from coupling.jacobian.linop import as_operator

VARIANTS = ("raw", "normalized", "abs_l2", "abs_l1")
_NEEDS_S = ("abs_l2", "abs_l1")


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _work_dtype(*xs) -> torch.dtype:
    """float64 if any input (tensor or operator) is float64, else float32."""
    for x in xs:
        if x is not None and getattr(x, "dtype", None) == torch.float64:
            return torch.float64
    return torch.float32


def _tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_triplet(trip, shape=None, what="triplet") -> tuple[torch.Tensor, ...]:
    """Validate a ``(U, S, V)`` tuple; ``shape`` is the (d_out, d_in) it must match."""
    if not isinstance(trip, (tuple, list)) or len(trip) != 3:
        raise ValueError(f"{what}: expected a (U, S, V) tuple of singular triplets, "
                         f"got {type(trip).__name__}")
    U, S, V = (_tensor(x) for x in trip)
    if U.ndim != 2 or V.ndim != 2 or S.ndim != 1:
        raise ValueError(f"{what}: expected U (d_out, K), S (K,), V (d_in, K); got shapes "
                         f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
    if not U.shape[1] == S.shape[0] == V.shape[1]:
        raise ValueError(f"{what}: U, S, V disagree on K ({U.shape[1]}, {S.shape[0]}, "
                         f"{V.shape[1]}); pass columns as singular vectors (U (d, K), not (K, d))")
    if shape is not None and (U.shape[0], V.shape[0]) != tuple(shape):
        raise ValueError(f"{what}: singular vectors have dimensions ({U.shape[0]}, {V.shape[0]}) "
                         f"but the operator is {tuple(shape)}")
    return U, S, V


def _check_refs(U_ref, V_ref, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate reference singular vectors ``U_ref (d_out, K)``, ``V_ref (d_in, K)``."""
    U_ref, V_ref = _tensor(U_ref), _tensor(V_ref)
    if U_ref.ndim != 2 or V_ref.ndim != 2 or U_ref.shape[1] != V_ref.shape[1]:
        raise ValueError(f"U_ref and V_ref must be (d, K) with the same K (columns = singular "
                         f"vectors), got {tuple(U_ref.shape)} and {tuple(V_ref.shape)}")
    if (U_ref.shape[0], V_ref.shape[0]) != tuple(shape):
        raise ValueError(f"reference vectors have dimensions ({U_ref.shape[0]}, "
                         f"{V_ref.shape[0]}) but J is {tuple(shape)}")
    return U_ref, V_ref


def _resolve_k(k, available: int, what: str) -> int:
    if k is None:
        return available
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} singular vectors available in {what}; "
                         f"compute more triplets or lower k")
    return int(k)


def _check_variants(variants: Iterable[str]) -> tuple[str, ...]:
    variants = (variants,) if isinstance(variants, str) else tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown mis-coupling variant(s) {bad}; choose from {VARIANTS}")
    return variants


# ----------------------------------------------------------------------------------------
# single coupling matrices
# ----------------------------------------------------------------------------------------
def coupling_matrix(J, U_ref, V_ref, k: int | None = None) -> torch.Tensor:
    """Exact ``A_k = U_ref[:, :k]^T (J @ V_ref[:, :k])``, shape ``(k, k)``.

    ``J``: dense ``(d_out, d_in)`` tensor or LinearOperator; ``U_ref (d_out, K)``,
    ``V_ref (d_in, K)``: singular vectors of the reference Jacobian; ``k`` defaults to K.
    Costs k products with J (one batched ``J @ M``); nothing d x d is formed.
    """
    op = as_operator(J)
    U_ref, V_ref = _check_refs(U_ref, V_ref, op.shape)
    k = _resolve_k(k, U_ref.shape[1], "U_ref/V_ref")
    dt = _work_dtype(op, U_ref, V_ref)
    JV = (op @ V_ref[:, :k].to(dt)).to(dt)
    return U_ref[:, :k].to(dtype=dt, device=JV.device).T @ JV


def coupling_matrix_factored(U, S, V, U_ref, V_ref, k: int | None = None) -> torch.Tensor:
    """Approximate ``A_k`` from stored rank-r factors ``J ~= U diag(S) V^T``.

    ``A_k ~= (U_ref_k^T U) diag(S) (V^T V_ref_k)``, cost ``O(d r k)``.  The error is the
    coupling of the discarded tail: ``||A_exact - A_factored||_2 <= s_{r+1}(J)``
    (so ``<= sqrt(k) s_{r+1}`` in Frobenius norm); exact when the factors are a full SVD.
    """
    U, S, V = _check_triplet((U, S, V), what="factors of J")
    U_ref, V_ref = _check_refs(U_ref, V_ref, (U.shape[0], V.shape[0]))
    k = _resolve_k(k, U_ref.shape[1], "U_ref/V_ref")
    dt = _work_dtype(U, S, V, U_ref, V_ref)
    U, S, V = U.to(dt), S.to(dt), V.to(dt)
    left = U_ref[:, :k].to(dt).T @ U            # (k, r)
    right = V.T @ V_ref[:, :k].to(dt)           # (r, k)
    return (left * S) @ right


# ----------------------------------------------------------------------------------------
# mis-coupling
# ----------------------------------------------------------------------------------------
def mis_coupling(A, variant: str = "normalized", s=None):
    """Mis-coupling of coupling matrices ``A (..., K, K)``; lower = more strongly coupled.

    ``variant``: one of ``VARIANTS`` (see the module docstring).  ``s (..., >=K)`` are the
    singular values of the J being coupled, required by ``"abs_l2"`` / ``"abs_l1"``; only
    the first K are used (S is descending, so these are the top K).

    Returns a Python float for one ``(K, K)`` matrix, else a float64 array of shape
    ``A.shape[:-2]``.  Undefined cases return ``nan`` rather than raising, so one bad
    layer does not abort a whole grid: ``"normalized"`` with ``||A||_F = 0`` (J vanishes
    on the reference subspace), ``"abs_l2"`` with ``||s|| = 0``, ``"abs_l1"`` with
    ``sum(s) = 0``.  :func:`mean_off_diagonal` skips nan.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown mis-coupling variant {variant!r}; choose from {VARIANTS}")
    A = np.asarray(A.detach().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float64)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square (..., K, K), got shape {A.shape}")
    K = A.shape[-1]
    eye = np.eye(K, dtype=bool)
    if variant in _NEEDS_S:
        if s is None:
            raise ValueError(f"variant {variant!r} needs s, the top-K singular values of the "
                             "J being coupled (pass s=S)")
        s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
        if s.ndim < 1 or s.shape[-1] < K:
            raise ValueError(f"s must hold at least K={K} singular values, got shape {s.shape}")
        s = s[..., :K]
        D = np.abs(A) - s[..., None, :] * eye  # |A| - diag(s), broadcast over the batch
        num = np.sqrt((D ** 2).sum(axis=(-2, -1)))
        den = np.sqrt((s ** 2).sum(-1)) if variant == "abs_l2" else s.sum(-1)
    else:
        num = np.sqrt((np.where(eye, 0.0, A) ** 2).sum(axis=(-2, -1)))
        den = np.sqrt((A ** 2).sum(axis=(-2, -1))) if variant == "normalized" else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.asarray(den) == 0, np.nan, num / np.where(den == 0, 1.0, den))
    return float(out) if out.ndim == 0 else out


def mean_off_diagonal(M):
    """Mean of ``M[..., l, l']`` over ``l != l'`` ignoring nan (the per-prompt score).

    ``M``: ``(L, L)`` or ``(..., L, L)``.  Returns a float (or an array over the leading
    axes); nan when no finite off-diagonal entry exists.  The entries left out are counted by
    :func:`nan_off_diagonal` (the scan's ``depth_nan_entries``).
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"expected a square (..., L, L) matrix, got shape {M.shape}")
    off = ~np.eye(M.shape[-1], dtype=bool)
    vals = np.where(off, M, np.nan)
    count = np.isfinite(vals).sum(axis=(-2, -1))
    total = np.where(np.isfinite(vals), vals, 0.0).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def nan_off_diagonal(*grids) -> int:
    """How many off-diagonal entries ``[l, l']`` (``l != l'``) are not finite in any of the
    ``(L, L)`` ``grids``: the entries :func:`mean_off_diagonal` leaves out of a mean, counted
    so that a mean over fewer pairs is never taken for a mean over all of them."""
    bad = None
    for M in grids:
        M = np.asarray(M, dtype=np.float64)
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"expected a square (L, L) grid, got shape {M.shape}")
        here = ~np.isfinite(M) & ~np.eye(M.shape[0], dtype=bool)
        bad = here if bad is None else bad | here
    return 0 if bad is None else int(bad.sum())
