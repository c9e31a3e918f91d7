"""Top-K singular triplets of a Jacobian, exactly or matrix-free.

Methods (``top_k_svd(J, k, method=...)``):

* ``exact``: the dense matrix (built with ``d`` products if ``J`` is an operator) and
  ``torch.linalg.svd``.  Exact to float32 round-off.
* ``lanczos``: ARPACK ``scipy.sparse.linalg.svds`` (implicitly restarted Lanczos on
  ``J^T J``) driven by operator products, ``tol=0`` (machine precision).  Exact, matrix-free.
  At most ``maxiter`` restarts (default :func:`default_maxiter`); if ARPACK has not converged
  by then it falls back to the dense SVD (the operator materialised by ``d`` products) and
  says so in ``SVDResult.fallback``.
* ``randomized``: Halko-Martinsson-Tropp subspace iteration with oversampling ``p`` and ``q``
  power iterations (re-orthonormalised each step), seeded.  Cheap but inaccurate on the
  nearly flat spectra of transformer blocks (BENCHMARKS.md: max principal
  angle ~1 at q<=2), so it is never the default.

``auto`` (the default) is ``exact`` (the dense Jacobian, from ``d`` products batched 128 at a
time) or ``lanczos`` (ARPACK on the operator, one vector per product, plus ``L K`` products for
the coupling rows), whichever costs less for ``(d, K)`` (:func:`dense_pays`, measured by
``scripts/bench_routes.py``) on the CPU; on an accelerator ``exact`` up to
``d = EXACT_MAX_D``.  Both are exact, so coupling values match the exact reference to
round-off; see BENCHMARKS.md for the numbers.

Every method also returns ``s_{K+1}`` (``SVDResult.s_next``), the first singular value left
out, so the gap ``s_K / s_{K+1}`` that decides whether the top-K subspace is determined at all
can be checked (``coupling.spectrum.spectral_gap``).

Once a dense ``J`` exists, :func:`dense_top_k` picks how to take its top-K: the full SVD for
small ``d`` or large ``K``, ARPACK on the dense matrix otherwise (on CPU at d=768 the full SVD
is ~40% of a one-token dense Jacobian's cost, ARPACK at K=10 ~15%; BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coupling.jacobian.linop import LinearOperator, as_operator

METHODS = ("auto", "exact", "randomized", "lanczos")
EXACT_MAX_D = 2048
# auto with K known (dense_pays): the dense route costs d products batched 128 at a time; the
# matrix-free route ARPACK's single-vector products (10-18x the cost of a batched one: J v by
# double backward, J^T u by a VJP) plus L K batched VJPs for the coupling rows.  It takes
# fewer products at every width measured (K = 10: 141-457 ARPACK + 120 row products against
# d), but not less time until d ~ 3000.  Measured (BENCHMARKS.md "Dense or matrix-free",
# scripts/bench_routes.py: one-token J of random GPT-2-style blocks, n = 71, 1 thread, two
# layers per cell, mean seconds): K = 10 dense 6.5x faster at d = 768, 2.7x at 1536, 1.7x at
# 2048, 1.17x at 3072, matrix-free 2.0x faster at 4096; K = 50 dense 7.8x at 768, 3.0x at
# 2048, 1.33x at 4096.  Crossovers (log-linear between the cells) at d ~ 3260 (K = 10) and
# ~ 4690 (K = 50); the line through them: matrix-free when d > 2900 + 36 K.
MATRIX_FREE_BASE = 2900
MATRIX_FREE_PER_K = 36
# dense_top_k: full SVD up to this width, or when K is at least this fraction of d.  ARPACK
# (single precision on a float32 J) costs ~K d^2 per restart cycle, the SVD ~d^3; on real
# block Jacobians (1 CPU thread, scripts/bench_dense_topk.py) ARPACK is faster in every cell
# measured, up to K = 150 at d = 768 (0.066 s against 0.091 s); its time, linear in K there,
# reaches the SVD's at K ~ d / 4.
FULL_SVD_MAX_D = 512
FULL_SVD_MIN_K_FRACTION = 1 / 4


# ARPACK restarts: each costs about ncv - K products with J and as many with J^T, so past
# ~d/(ncv - K) restarts it has spent more than the d products that materialise J for the
# dense SVD.  Measured need at tol=0 on random-init GPT-2-small blocks (d=768): 250-340
# products for K+1 = 10 or 11 values (10-15 restarts), 490-515 for K+1 = 50 or 51; asking
# for the one extra value s_{K+1} cost nothing measurable.  At least 100 restarts: ~7x that.
ARPACK_MIN_MAXITER = 100
# the dense fall-back materialises J: refused above this width (4 GiB of float32)
DENSE_FALLBACK_MAX_D = 32768


@dataclass
class SVDResult:
    """``J ~= U diag(S) V^T`` on the top-K: ``U (d_out, K)``, ``S (K,)`` descending, ``V (d_in, K)``.

    ``s_next``: ``s_{K+1}`` (0-d tensor), the largest singular value left out, or ``None``
    when ``K = min(d_out, d_in)``.  ``fallback``: why another route than the one asked for
    gave the result (ARPACK non-convergence -> dense SVD), else ``None``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    s_next: torch.Tensor | None = None
    fallback: str | None = None

    @property
    def k(self) -> int:
        return self.S.shape[0]

    @property
    def gap(self) -> float:
        """``s_K / s_{K+1}`` (``inf`` when nothing is left out or ``s_{K+1} = 0``)."""
        if self.s_next is None or float(self.s_next) == 0:
            return float("inf")
        return float(self.S[-1]) / float(self.s_next)

    def truncate(self, k: int) -> "SVDResult":
        s_next = self.S[k] if k < self.k else self.s_next
        return SVDResult(self.U[:, :k], self.S[:k], self.V[:, :k], s_next, self.fallback)

    def as_tuple(self):
        return self.U, self.S, self.V

    def to(self, device) -> "SVDResult":
        """A copy on ``device`` (e.g. ``"cpu"`` to ship between processes)."""
        move = lambda x: None if x is None else x.detach().to(device)  # noqa: E731
        return SVDResult(move(self.U), move(self.S), move(self.V), move(self.s_next),
                         self.fallback)


def resolve_method(method: str, d: int, k: int | None = None,
                   device: torch.device | str = "cpu") -> str:
    """The route ``method`` means at width ``d`` for the top-``k`` on ``device``: ``auto`` ->
    ``exact`` or ``lanczos`` (:func:`dense_pays`).  Every caller that chooses a route passes
    ``k`` and the device the products run on; ``k=None`` is only for validating the name."""
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}: use one of {', '.join(METHODS)}")
    if method == "auto":
        return "exact" if dense_pays(d, k, device) else "lanczos"
    return method


def dense_pays(d: int, k: int | None = None, device: torch.device | str = "cpu") -> bool:
    """Whether the dense Jacobian (``d`` batched products) costs less than ARPACK on the
    operator plus the coupling rows, for the top-``k`` at width ``d`` (constants above).

    Measured on CPU only.  On an accelerator a single-vector product costs about as much as
    a batch of 128 (it is latency-bound), so the dense route is kept there up to
    ``EXACT_MAX_D``, as without ``k``."""
    if k is None or torch.device(device).type != "cpu":
        return d <= EXACT_MAX_D
    return d <= MATRIX_FREE_BASE + MATRIX_FREE_PER_K * k


def may_be_dense(method: str, d: int, k: int) -> bool:
    """Whether the dense route is taken for ``(d, k)`` on some device: what a memory plan that
    does not know the device yet must budget for (the dense ``J`` costs ``d^2`` floats)."""
    return any(resolve_method(method, d, k, dev) == "exact" for dev in ("cpu", "cuda"))


def top_k_svd(J, k: int, method: str = "auto", *, oversample: int = 10, n_iter: int = 4,
              seed: int = 0, maxiter: int | None = None) -> SVDResult:
    """Top-``k`` singular triplets of ``J`` (dense tensor or ``LinearOperator``) and ``s_{k+1}``.

    ``maxiter``: ARPACK restarts before the dense fall-back (``lanczos``; default
    :func:`default_maxiter`)."""
    op = as_operator(J)
    d = min(op.shape)
    if not 1 <= k <= d:
        raise ValueError(f"K={k} must be between 1 and the Jacobian size d={d}: lower --k")
    method = resolve_method(method, d, k, op.device)
    if method == "exact":
        return _exact(op.to_dense(), k)
    if method == "lanczos":
        return _lanczos(op, k, seed, maxiter)
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


def dense_top_k(J: torch.Tensor, k: int, seed: int = 0, maxiter: int | None = None) -> SVDResult:
    """Exact top-``k`` triplets of a dense ``J``: full SVD or ARPACK (:func:`arpack_top_k`),
    whichever is cheaper (:func:`full_svd_pays`)."""
    if full_svd_pays(min(J.shape), k, J.device) or k + 1 >= min(J.shape):
        return _exact(J, k)
    return arpack_top_k(J, k, seed, maxiter)


def arpack_top_k(J: torch.Tensor, k: int, seed: int = 0, maxiter: int | None = None) -> SVDResult:
    """Top-``k`` triplets of a dense ``J`` by ARPACK on the matrix, in its own precision.

    ARPACK gets the matrix itself (float32 or float64): its products are then numpy's, with
    no conversion of every vector to and from torch (20% of its time at d = 768, K = 10).  A
    float32 ``J`` is known to float32 round-off only, so single-precision ARPACK (``tol=0``:
    to float32 machine precision) determines its triplets as well as the float32 full SVD
    of the ``exact`` route does, at 2-3x the speed of ARPACK in float64 on the same matrix
    (BENCHMARKS.md, "Top-K of a dense J").  Not converged in ``maxiter`` restarts: the full
    SVD, recorded in ``fallback``."""
    d = min(J.shape)
    A = _at_least_float32(J.detach()).cpu().numpy()
    maxiter = default_maxiter(d, k + 1) if maxiter is None else int(maxiter)
    triplets = _arpack(A, k, seed, maxiter)
    if triplets is None:
        return _exact(J, k, fallback=f"dense (ARPACK not converged in {maxiter} restarts)")
    return _as_result(*triplets, k, _at_least_float32(J).dtype, J.device)


def default_maxiter(d: int, k: int) -> int:
    """ARPACK restarts allowed before the dense fall-back: about the point where ARPACK has
    used as many products as materialising ``J`` takes (``d``), at least
    ``ARPACK_MIN_MAXITER``."""
    ncv = min(d, max(2 * k + 1, 20))        # scipy's default Lanczos basis size
    return max(ARPACK_MIN_MAXITER, -(-d // max(1, ncv - k)))


def _at_least_float32(A: torch.Tensor) -> torch.Tensor:
    return A if A.dtype in (torch.float32, torch.float64) else A.float()


def _exact(A: torch.Tensor, k: int, fallback: str | None = None) -> SVDResult:
    A = _at_least_float32(A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    # copies, not views: a view would keep the whole d x d U and Vh alive with the result
    return SVDResult(U[:, :k].clone(), S[:k].clone(), Vh[:k].T.clone(),
                     S[k].clone() if k < S.shape[0] else None, fallback)


def _lanczos(op: LinearOperator, k: int, seed: int, maxiter: int | None = None) -> SVDResult:
    """Top ``k`` triplets and ``s_{k+1}`` by ARPACK (``k + 1`` values), capped at ``maxiter``
    restarts; on non-convergence the dense SVD of the materialised operator, recorded."""
    d = min(op.shape)
    if k + 1 >= d:  # ARPACK needs k + 1 < min(shape)
        return _exact(op.to_dense(), k)
    maxiter = default_maxiter(d, k + 1) if maxiter is None else int(maxiter)
    triplets = _arpack(op.to_scipy(), k, seed, maxiter)
    if triplets is None:
        return _dense_fallback(op, k, maxiter)
    return _as_result(*triplets, k, op.dtype, op.device)


def _arpack(A, k: int, seed: int, maxiter: int):
    """``(u, s, vt)`` of the top ``k + 1`` by ``svds`` (``tol=0``, seeded start), descending,
    or None when ARPACK has not converged in ``maxiter`` restarts."""
    from scipy.sparse.linalg import ArpackNoConvergence, svds

    m, n = A.shape
    # the start vector in A's precision: a float64 one would run ARPACK in float64
    v0 = np.random.default_rng(seed).standard_normal(n if n <= m else m).astype(A.dtype)
    try:
        u, s, vt = svds(A, k=k + 1, tol=0, v0=v0, maxiter=maxiter, solver="arpack")
    except ArpackNoConvergence:
        return None
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vt[order]


def _as_result(u, s, vt, k: int, dtype, device) -> SVDResult:
    to = dict(dtype=dtype, device=device)
    return SVDResult(torch.as_tensor(u[:, :k].copy(), **to), torch.as_tensor(s[:k].copy(), **to),
                     torch.as_tensor(vt[:k].T.copy(), **to), torch.as_tensor(s[k], **to))


def _dense_fallback(op: LinearOperator, k: int, maxiter: int) -> SVDResult:
    d = max(op.shape)
    if d > DENSE_FALLBACK_MAX_D:
        raise RuntimeError(f"ARPACK did not converge in {maxiter} restarts and a dense "
                           f"{op.shape[0]}x{op.shape[1]} Jacobian is too large to fall back "
                           f"on: pass a larger maxiter, or --svd randomized")
    return _exact(op.to_dense(), k, fallback=f"dense (ARPACK not converged in {maxiter} restarts)")


def randomized_svd(J, k: int, oversample: int = 10, n_iter: int = 4, seed: int = 0) -> SVDResult:
    """Subspace iteration (Halko et al. 2011, Alg. 4.4) with ``k + oversample`` columns.

    At least ``k + 1`` columns, so ``s_next`` estimates ``s_{k+1}`` (from below, like every
    value here: Ritz values of a subspace).
    """
    op = as_operator(J)
    m, n = op.shape
    ell = min(k + max(oversample, 1), m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((n, ell), generator=gen, dtype=op.dtype).to(op.device)
    Q, _ = torch.linalg.qr(op @ omega)
    for _ in range(n_iter):
        W, _ = torch.linalg.qr(op.rmatmat(Q))
        Q, _ = torch.linalg.qr(op @ W)
    B = op.rmatmat(Q).T                      # (ell, n) = Q^T J
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return SVDResult(U[:, :k], S[:k], Vh[:k].T, S[k] if k < S.shape[0] else None)
