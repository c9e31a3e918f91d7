"""Block Jacobians of the residual branch: exact matrices and matrix-free operators.

``J^l_{t1 t2} = d f^l(X^{l-1})_{t2} / d x^{l-1}_{t1}`` (docs/methods.md, Eq. 8), a ``d x d`` matrix
(row = output coordinate at token t2, column = input coordinate at token t1).

* ``BlockJacobian`` is a ``LinearOperator``: ``J @ M`` costs one batched JVP (forward mode)
  through the block, ``J.T @ M`` one batched VJP (reverse mode, the block's forward done once
  and reused).  Nothing ``d x d`` is ever allocated.
* ``exact_jacobians`` builds dense ``J_{t1 t2}`` for all ``t1`` at once from one VJP sweep
  seeded at output token ``t2`` (``d`` cotangents, chunked).
"""
from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from coupling.jacobian.linop import LinearOperator


class NonFiniteJacobianError(FloatingPointError):
    pass


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteJacobianError(
            f"non-finite values in {what}: the block produced inf/nan (try float32 weights "
            "with --dtype float32, or check the prompt)")
    return t


class BlockJacobian(LinearOperator):
    """Matrix-free ``J_{t1 t2}`` of a residual-branch function ``f: (1, n, d) -> (1, n, d)``.

    ``chunk`` bounds how many products go through the block at once (memory).  ``J.T @ M``
    (VJPs, the forward kept) costs less than ``J @ M`` (forward mode).
    """

    transpose_is_cheaper = True

    def __init__(self, f, X: torch.Tensor, t1: int, t2: int, chunk: int = 64,
                 name: str = "block"):
        if X.ndim == 2:
            X = X[None]
        self.f, self.X = f, X.detach()
        n, d = X.shape[1], X.shape[2]
        for t in (t1, t2):
            if not -n <= t < n:
                raise ValueError(f"token index {t} out of range for a prompt of {n} tokens")
        self.t1, self.t2 = t1 % n, t2 % n
        self.shape = (d, d)
        self.dtype, self.device = X.dtype, X.device
        self.chunk = chunk
        self.name = name
        self._vjp_fn = None
        self.n_products = 0  # JVPs + VJPs issued, for cost accounting

    def _tangents(self, M: torch.Tensor, t: int) -> torch.Tensor:
        """Columns of ``M`` (d, k) placed at token ``t`` of k zero inputs (k, 1, n, d)."""
        k = M.shape[1]
        T = torch.zeros((k,) + tuple(self.X.shape), dtype=self.dtype, device=self.device)
        T[:, 0, t, :] = M.T
        return T

    def _matmat(self, M):
        outs = []
        for start in range(0, M.shape[1], self.chunk):
            T = self._tangents(M[:, start:start + self.chunk], self.t1)
            push = vmap(lambda v: jvp(self.f, (self.X,), (v,))[1])
            outs.append(push(T)[:, 0, self.t2, :].T)
            self.n_products += T.shape[0]
        return check_finite(torch.cat(outs, dim=1), self._what())

    def _rmatmat(self, M):
        if self._vjp_fn is None:
            _, self._vjp_fn = vjp(self.f, self.X)
        outs = []
        for start in range(0, M.shape[1], self.chunk):
            C = self._tangents(M[:, start:start + self.chunk], self.t2)
            pull = vmap(lambda c: self._vjp_fn(c)[0])
            outs.append(pull(C)[:, 0, self.t1, :].T)
            self.n_products += C.shape[0]
        return check_finite(torch.cat(outs, dim=1), self._what())

    def _what(self) -> str:
        return f"the Jacobian of {self.name} at tokens (t1={self.t1}, t2={self.t2})"


def exact_jacobians(f, X: torch.Tensor, t2: int, t1s=None, chunk: int = 64,
                    name: str = "block") -> torch.Tensor:
    """Dense ``J_{t1 t2}`` for every ``t1`` in ``t1s`` (default all) from one VJP sweep.

    Returns ``(len(t1s), d, d)``.  Cost: one forward + ``d`` VJPs, whatever ``len(t1s)``.
    """
    if X.ndim == 2:
        X = X[None]
    X = X.detach()
    n, d = X.shape[1], X.shape[2]
    t2 = t2 % n
    t1s = list(range(n)) if t1s is None else [t % n for t in t1s]
    _, vjp_fn = vjp(f, X)
    pull = vmap(lambda c: vjp_fn(c)[0])
    J = torch.empty((len(t1s), d, d), dtype=X.dtype, device=X.device)
    idx = torch.as_tensor(t1s, device=X.device)
    for start in range(0, d, chunk):
        rows = torch.arange(start, min(start + chunk, d), device=X.device)
        C = torch.zeros((len(rows),) + tuple(X.shape), dtype=X.dtype, device=X.device)
        C[torch.arange(len(rows)), 0, t2, rows] = 1.0
        G = pull(C)[:, 0]                       # (rows, n, d): d out_row / d x_{t1, :}
        J[:, start:start + len(rows), :] = G[:, idx, :].permute(1, 0, 2)
    for i, t1 in enumerate(t1s):
        check_finite(J[i], f"the Jacobian of {name} at tokens (t1={t1}, t2={t2})")
    return J


def exact_jacobian(f, X: torch.Tensor, t1: int, t2: int, chunk: int = 64,
                   name: str = "block") -> torch.Tensor:
    """Dense ``J_{t1 t2}`` (d, d)."""
    return exact_jacobians(f, X, t2, [t1], chunk, name)[0]


def exact_jacobians_from_input(f, X: torch.Tensor, t1: int, chunk: int = 64,
                               name: str = "block") -> torch.Tensor:
    """Dense ``J_{t1 t2}`` for every output ``t2`` from one JVP sweep seeded at input ``t1``.

    Returns ``(n, d, d)``, entry ``t2`` = ``J_{t1 t2}``.  Cost: ``d`` JVPs through ``f``
    (the column analogue of :func:`exact_jacobians`).
    """
    if X.ndim == 2:
        X = X[None]
    X = X.detach()
    n, d = X.shape[1], X.shape[2]
    t1 = t1 % n
    push = vmap(lambda v: jvp(f, (X,), (v,))[1])
    J = torch.empty((n, d, d), dtype=X.dtype, device=X.device)
    for start in range(0, d, chunk):
        cols = torch.arange(start, min(start + chunk, d), device=X.device)
        T = torch.zeros((len(cols),) + tuple(X.shape), dtype=X.dtype, device=X.device)
        T[torch.arange(len(cols)), 0, t1, cols] = 1.0
        J[:, :, start:start + len(cols)] = push(T)[:, 0].permute(1, 2, 0)  # (n, d_out, cols)
    for t2 in range(n):
        check_finite(J[t2], f"the Jacobian of {name} at tokens (t1={t1}, t2={t2})")
    return J
