"""Linear operators as first-class objects (in the spirit of curvlinops / scipy's LinearOperator).

A block Jacobian ``J`` is ``d_out x d_in`` but we almost never want it as a matrix: every
quantity we need (top-K singular triplets, coupling matrices ``U'^T J V'``) only needs
products ``J @ M`` and ``J.T @ M`` with thin ``M`` of shape ``(d, k)``.  ``LinearOperator``
is the small protocol every such object follows; a dense ``torch.Tensor`` satisfies it too,
so the maths code is written once for both.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch


class LinearOperator:
    """Abstract ``d_out x d_in`` operator with batched products.

    Subclasses implement ``_matmat(M)`` (``M``: ``(d_in, k)`` -> ``(d_out, k)``) and
    ``_rmatmat(M)`` (``M``: ``(d_out, k)`` -> ``(d_in, k)``, the transpose product).
    """

    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    # True where ``J.T @ M`` costs less than ``J @ M`` (VJPs against forward mode or a double
    # backward), so that work that can go either way (coupling rows) takes the transpose
    transpose_is_cheaper: bool = False

    def _matmat(self, M: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, M: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- products ---------------------------------------------------------------------
    def __matmul__(self, M: torch.Tensor) -> torch.Tensor:
        return _apply(self._matmat, M, self.shape[1], self.dtype, self.device)

    def rmatmat(self, M: torch.Tensor) -> torch.Tensor:
        """``J.T @ M``."""
        return _apply(self._rmatmat, M, self.shape[0], self.dtype, self.device)

    @property
    def T(self) -> "LinearOperator":
        return _Transposed(self)

    def to_dense(self) -> torch.Tensor:
        """The full matrix, built column by column (``d_in`` products). Only for small d."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self @ eye

    def to_scipy(self) -> sla.LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` view (for ARPACK ``svds``)."""
        def mm(x):
            x = np.asarray(x, dtype=np.float64)
            vec = x.ndim == 1
            t = torch.as_tensor(x.reshape(x.shape[0], -1), dtype=self.dtype, device=self.device)
            y = (self @ t).double().cpu().numpy()
            return y[:, 0] if vec else y

        def rmm(x):
            x = np.asarray(x, dtype=np.float64)
            vec = x.ndim == 1
            t = torch.as_tensor(x.reshape(x.shape[0], -1), dtype=self.dtype, device=self.device)
            y = self.rmatmat(t).double().cpu().numpy()
            return y[:, 0] if vec else y

        return sla.LinearOperator(self.shape, matvec=mm, rmatvec=rmm, matmat=mm,
                                  rmatmat=rmm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class _Transposed(LinearOperator):
    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape = (op.shape[1], op.shape[0])
        self.dtype, self.device = op.dtype, op.device

    def _matmat(self, M):
        return self.op._rmatmat(M)

    def _rmatmat(self, M):
        return self.op._matmat(M)

    @property
    def T(self) -> LinearOperator:
        return self.op


class DenseOperator(LinearOperator):
    """Wrap an explicit matrix so it can be passed wherever an operator is expected."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2:
            raise ValueError(f"DenseOperator needs a 2-D matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype, self.device = matrix.dtype, matrix.device

    def _matmat(self, M):
        return self.matrix @ M

    def _rmatmat(self, M):
        return self.matrix.T @ M

    def to_dense(self):
        return self.matrix


def as_operator(J) -> LinearOperator:
    """Accept a ``LinearOperator`` or a 2-D tensor/array and return an operator."""
    if isinstance(J, LinearOperator):
        return J
    if isinstance(J, np.ndarray):
        J = torch.from_numpy(J)
    if isinstance(J, torch.Tensor):
        return DenseOperator(J)
    raise TypeError(f"expected a LinearOperator or a 2-D tensor, got {type(J).__name__}")


def _apply(fn, M, d_in, dtype, device):
    if M.ndim not in (1, 2):
        raise ValueError(f"operator products take a vector or a (d, k) matrix, got {tuple(M.shape)}")
    if M.shape[0] != d_in:
        raise ValueError(f"shape mismatch: operator expects {d_in} rows, got {M.shape[0]}")
    vec = M.ndim == 1
    out = fn(M.reshape(d_in, -1).to(dtype=dtype, device=device))
    return out[:, 0] if vec else out
