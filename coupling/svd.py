"""Top-K singular triplets of a Jacobian, exactly or matrix-free.

Methods (``top_k_svd(J, k, method=...)``):

* ``exact``: the dense matrix (built with ``d`` products if ``J`` is an operator) and
  ``torch.linalg.svd``.  Exact to float32 round-off.
* ``lanczos``: ARPACK ``scipy.sparse.linalg.svds`` (implicitly restarted Lanczos on
  ``J^T J``) driven by operator products, ``tol=0`` (machine precision).  Exact, matrix-free.
* ``randomized``: Halko-Martinsson-Tropp subspace iteration with oversampling ``p`` and ``q``
  power iterations (re-orthonormalised each step), seeded.  Cheap but inaccurate on the
  nearly flat spectra of transformer blocks (``../shared/MEASUREMENTS.md``: max principal
  angle ~1 at q<=2), so it is never the default.

``auto`` (the default) is ``exact`` when ``d <= EXACT_MAX_D`` (the dense Jacobian is cheap to
hold) and ``lanczos`` above.  Both are exact, so coupling values match the exact reference to
round-off; see BENCHMARKS.md for the numbers.

Once a dense ``J`` exists, :func:`dense_top_k` picks how to take its top-K: the full SVD for
small ``d`` or large ``K``, ARPACK on the dense matrix otherwise (on CPU at d=768 the full SVD
is ~40% of a one-token dense Jacobian's cost, ARPACK at K=10 ~15%; BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .linop import LinearOperator, as_operator

METHODS = ("auto", "exact", "randomized", "lanczos")
EXACT_MAX_D = 2048
# dense_top_k: full SVD up to this width, or when K is at least this fraction of d.  ARPACK
# costs ~K d^2 per restart cycle, the SVD ~d^3; on real block Jacobians (2 CPU threads) the
# crossover is K ~ 40 at d = 768 and K > 50 at d = 1024 (scripts/bench_dense_topk.py).
FULL_SVD_MAX_D = 512
FULL_SVD_MIN_K_FRACTION = 1 / 16


@dataclass
class SVDResult:
    """``J ~= U diag(S) V^T`` on the top-K: ``U (d_out, K)``, ``S (K,)`` descending, ``V (d_in, K)``."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return self.S.shape[0]

    def truncate(self, k: int) -> "SVDResult":
        return SVDResult(self.U[:, :k], self.S[:k], self.V[:, :k])

    def as_tuple(self):
        return self.U, self.S, self.V


def resolve_method(method: str, d: int) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}: use one of {', '.join(METHODS)}")
    if method == "auto":
        return "exact" if d <= EXACT_MAX_D else "lanczos"
    return method


def top_k_svd(J, k: int, method: str = "auto", *, oversample: int = 10, n_iter: int = 4,
              seed: int = 0) -> SVDResult:
    """Top-``k`` singular triplets of ``J`` (dense tensor or ``LinearOperator``)."""
    op = as_operator(J)
    d = min(op.shape)
    if not 1 <= k <= d:
        raise ValueError(f"K={k} must be between 1 and the Jacobian size d={d}: lower --k")
    method = resolve_method(method, d)
    if method == "exact":
        return _exact(op.to_dense(), k)
    if method == "lanczos":
        return _lanczos(op, k, seed)
    return randomized_svd(op, k, oversample=oversample, n_iter=n_iter, seed=seed)


def svd_of_dense(J: torch.Tensor, k: int) -> SVDResult:
    """Top-k triplets of an explicit matrix (full SVD, computed in at least float32)."""
    return _exact(J, k)


def full_svd_pays(d: int, k: int, device: torch.device | str = "cpu") -> bool:
    """Whether the full SVD of a dense ``d x d`` matrix beats ARPACK for its top-``k``.

    Measured on CPU only (BENCHMARKS.md); on an accelerator the full SVD stays on the device
    while ARPACK would copy a vector to the host per product, so the full SVD is kept there.
    """
    if torch.device(device).type != "cpu":
        return True
    return d <= FULL_SVD_MAX_D or k >= FULL_SVD_MIN_K_FRACTION * d


def dense_top_k(J: torch.Tensor, k: int, seed: int = 0) -> SVDResult:
    """Exact top-``k`` triplets of a dense ``J``: full SVD or ARPACK, whichever is cheaper."""
    if full_svd_pays(min(J.shape), k, J.device):
        return _exact(J, k)
    return _lanczos(as_operator(_at_least_float32(J)), k, seed)


def _at_least_float32(A: torch.Tensor) -> torch.Tensor:
    return A if A.dtype in (torch.float32, torch.float64) else A.float()


def _exact(A: torch.Tensor, k: int) -> SVDResult:
    A = _at_least_float32(A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return SVDResult(U[:, :k], S[:k], Vh[:k].T)


def _lanczos(op: LinearOperator, k: int, seed: int) -> SVDResult:
    from scipy.sparse.linalg import svds

    d = min(op.shape)
    if k >= d:  # ARPACK needs k < min(shape)
        return _exact(op.to_dense(), k)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(op.shape[1] if op.shape[1] <= op.shape[0] else op.shape[0])
    u, s, vt = svds(op.to_scipy(), k=k, tol=0, v0=v0, solver="arpack")
    order = np.argsort(s)[::-1]
    to = dict(dtype=op.dtype, device=op.device)
    return SVDResult(torch.as_tensor(u[:, order].copy(), **to),
                     torch.as_tensor(s[order].copy(), **to),
                     torch.as_tensor(vt[order].T.copy(), **to))


def randomized_svd(J, k: int, oversample: int = 10, n_iter: int = 4, seed: int = 0) -> SVDResult:
    """Subspace iteration (Halko et al. 2011, Alg. 4.4) with ``k + oversample`` columns."""
    op = as_operator(J)
    m, n = op.shape
    ell = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((n, ell), generator=gen, dtype=op.dtype).to(op.device)
    Q, _ = torch.linalg.qr(op @ omega)
    for _ in range(n_iter):
        W, _ = torch.linalg.qr(op.rmatmat(Q))
        Q, _ = torch.linalg.qr(op @ W)
    B = op.rmatmat(Q).T                      # (ell, n) = Q^T J
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return SVDResult(U[:, :k], S[:k], Vh[:k].T)
