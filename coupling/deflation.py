"""LN-deflated Jacobians: remove the trivial null directions that normalization layers create.

Why
---
A LayerNorm ``y = g * (x - mean(x)) / sigma(x) + b`` has Jacobian
``dy/dx = diag(g) / sigma * (I - 1 1^T / d - xh xh^T / d)`` with ``xh = (x - mean) / sigma``:
it kills the all-ones direction (shift invariance) and the centred input ``x - mean(x)``
(scale invariance).  RMSNorm ``y = g * x / rms(x)`` kills the input direction ``x``.  (Both
exactly only with ``eps = 0``; with the usual eps the singular value is ``O(eps)``.)
On the output side the left null vectors are ``g^{-1} * 1`` and ``g^{-1} * xh`` (LayerNorm)
or ``g^{-1} * x`` (RMSNorm).

Consequences for coupling:

* **Pre-LN** blocks (GPT-2, Llama, Pythia): every branch starts with a norm, so every
  ``J^l_{t1 t2}`` has the all-ones vector (LayerNorm) in its input-side null space, shared
  across layers; each block's own norm inputs are further (layer-specific) null directions.
* **Post-LN** encoders (BERT): the block output passes through a LayerNorm, so the
  Jacobians share output-side null directions (ones, and with ``g = 1`` at init, the
  normalized outputs).
* These shared directions are structure of the architecture, not learned alignment: a
  random-init post-LN model can look "coupled" through them alone whenever K reaches
  into the (near-)null part of the spectrum.

What this module does
---------------------
Project the trivial directions out on both sides and analyse
``J_defl = (I - Q_out Q_out^T) J (I - Q_in Q_in^T)`` instead of ``J``, matrix-free:

* :func:`norm_null_directions` - the null vectors of a LayerNorm/RMSNorm at its input ``x``;
* :func:`deflation_basis` - an orthonormal basis ``Q (d, r)`` of the span of given vectors
  (optionally with the all-ones vector), dropping zero or linearly dependent ones;
* :class:`DeflatedOperator` - the projected operator, a ``LinearOperator`` (products only);
* :func:`deflate` - the one-call convenience.

The singular triplets of ``J_defl`` (computed by the usual operator SVD) then feed the
coupling code unchanged.  Which vectors to pass (which norm inputs, which side) depends on
the architecture and is the caller's choice; this module only does the linear algebra.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .linop import LinearOperator, as_operator


def _vec(v, i: int) -> torch.Tensor:
    t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"vectors[{i}]: expected a tensor or numpy array, got {type(v).__name__}")
    if t.ndim != 1:
        raise ValueError(f"vectors[{i}]: expected a 1-D vector (d,), got shape {tuple(t.shape)}; "
                         "pass several vectors as a list")
    if not torch.isfinite(t).all():
        raise ValueError(f"vectors[{i}] has non-finite entries")
    return t.detach()


def norm_null_directions(x, kind: str = "layernorm", weight=None, side: str = "in"):
    """Null vectors of a normalization layer's Jacobian at input ``x (d,)``.

    ``kind``: ``"layernorm"`` -> ``[1, x - mean(x)]``; ``"rmsnorm"`` -> ``[x]``.
    ``side="in"``: right null vectors (``J v = 0``); ``side="out"``: left null vectors
    (``v^T J = 0``), which are the above divided elementwise by the gain ``weight``.
    Returns a list of 1-D tensors (not orthonormalized: see :func:`deflation_basis`).
    """
    x = _vec(x, 0)
    if kind == "layernorm":
        vecs = [torch.ones_like(x), x - x.mean()]
    elif kind == "rmsnorm":
        vecs = [x.clone()]
    else:
        raise ValueError(f"kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
    if side == "in":
        return vecs
    if side != "out":
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    if weight is None:
        return vecs
    w = _vec(weight, 0).to(x.dtype)
    if (w == 0).any():
        raise ValueError("the norm's weight has zero entries: its left null space is larger "
                         "than the returned vectors; pass weight=None to ignore the gain")
    return [v / w for v in vecs]


def deflation_basis(vectors: Sequence, include_ones: bool = False, d: int | None = None,
                    tol: float = 1e-6, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthonormal basis ``Q (d, r)`` of ``span(vectors [+ ones])``.

    Gram-Schmidt in float64 (two passes for stability), ones first when included; a
    vector is dropped when what is left of it after projecting out the previous ones is
    below ``tol`` times its norm (zero, repeated, or linearly dependent vectors).
    ``d`` is needed only when ``vectors`` is empty.  Returns ``dtype``, by default float64
    if any vector is float64, else float32 (``r`` may be 0: shape ``(d, 0)``).
    """
    vecs = [_vec(v, i) for i, v in enumerate(vectors)]
    dims = {v.shape[0] for v in vecs} | ({d} if d is not None else set())
    if len(dims) != 1:
        raise ValueError(f"vectors (and d) disagree on the dimension: {sorted(dims)}" if dims else
                         "no vectors given: pass d to get an empty (or all-ones) basis")
    d = dims.pop()
    if dtype is None:
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in vecs) else torch.float32
    device = vecs[0].device if vecs else torch.device("cpu")
    cols = [v.to(torch.float64) for v in vecs]
    if include_ones:
        cols.insert(0, torch.ones(d, dtype=torch.float64, device=device))
    basis: list[torch.Tensor] = []
    for c in cols:
        c = c.to(device)
        norm0 = c.norm()
        for _ in range(2):  # re-orthogonalize once: classical GS loses orthogonality
            for q in basis:
                c = c - (q @ c) * q
        if norm0 > 0 and c.norm() > tol * norm0:
            basis.append(c / c.norm())
    Q = torch.stack(basis, 1) if basis else torch.zeros(d, 0, dtype=torch.float64, device=device)
    return Q.to(dtype)


class DeflatedOperator(LinearOperator):
    """``(I - Q_out Q_out^T) J (I - Q_in Q_in^T)`` from products with ``J`` only.

    ``J``: ``(d_out, d_in)`` tensor or LinearOperator; ``Q_out (d_out, r_out)`` and
    ``Q_in (d_in, r_in)`` orthonormal columns (``None`` = no projection on that side).
    Projections are done in at least float32; results come back in ``J``'s dtype.
    """

    def __init__(self, J, Q_out: torch.Tensor | None = None, Q_in: torch.Tensor | None = None):
        self.op = as_operator(J)
        self.shape = tuple(self.op.shape)
        self.dtype, self.device = self.op.dtype, self.op.device
        self._ct = torch.promote_types(self.dtype, torch.float32)
        self.Q_out = self._check_q(Q_out, self.shape[0], "Q_out")
        self.Q_in = self._check_q(Q_in, self.shape[1], "Q_in")

    def _check_q(self, Q, d, name):
        if Q is None:
            return None
        Q = torch.from_numpy(Q) if isinstance(Q, np.ndarray) else Q
        if Q.ndim != 2 or Q.shape[0] != d:
            raise ValueError(f"{name} must be ({d}, r) for an operator of shape {self.shape}, "
                             f"got {tuple(Q.shape)}")
        if Q.shape[1] == 0:
            return None
        gram = Q.double().T @ Q.double()
        if not torch.allclose(gram, torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device), atol=1e-4):
            raise ValueError(f"{name} must have orthonormal columns: build it with "
                             "deflation_basis(vectors)")
        return Q.detach().to(dtype=self._ct, device=self.device)

    @staticmethod
    def _project_out(Q, M):
        return M if Q is None else M - Q @ (Q.T @ M)

    def _matmat(self, M):
        M = self._project_out(self.Q_in, M.to(self._ct))
        Y = (self.op @ M).to(self._ct)
        return self._project_out(self.Q_out, Y).to(self.dtype)

    def _rmatmat(self, M):
        M = self._project_out(self.Q_out, M.to(self._ct))
        Z = self.op.rmatmat(M).to(self._ct)
        return self._project_out(self.Q_in, Z).to(self.dtype)


def deflate(J, in_vectors: Sequence = (), out_vectors: Sequence = (),
            include_ones: bool | str = True, tol: float = 1e-6) -> DeflatedOperator:
    """Deflate ``J`` by ``in_vectors`` (input side) and ``out_vectors`` (output side).

    ``include_ones``: ``True`` adds the all-ones vector on both sides, ``"in"`` / ``"out"``
    on that side only, ``False`` nowhere (LayerNorm: input side for pre-LN blocks, output
    side for post-LN ones).  Afterwards ``J_defl @ v = 0`` for every input-side vector and
    ``J_defl.T @ w = 0`` for every output-side vector.
    """
    if include_ones not in (True, False, "in", "out"):
        raise ValueError(f"include_ones must be True, False, 'in' or 'out', got {include_ones!r}")
    op = as_operator(J)
    d_out, d_in = op.shape
    # float64 bases; DeflatedOperator rounds them to its own compute dtype
    Q_in = deflation_basis(in_vectors, include_ones in (True, "in"), d=d_in, tol=tol,
                           dtype=torch.float64)
    Q_out = deflation_basis(out_vectors, include_ones in (True, "out"), d=d_out, tol=tol,
                            dtype=torch.float64)
    return DeflatedOperator(op, Q_out=Q_out, Q_in=Q_in)
