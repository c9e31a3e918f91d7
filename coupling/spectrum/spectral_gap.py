"""Is a top-K singular subspace determined?  The ``s_K / s_{K+1}`` gap against round-off.

Every coupling number is built on the top-K singular vectors of a block Jacobian.  Block
spectra are nearly flat (``s_K / s_{K+1}`` = 1.002-1.04 measured), and when ``s_K`` and
``s_{K+1}`` are closer than the round-off in ``J`` the top-K subspace is an arbitrary pick
from the near-degenerate cluster: so is every number computed from it.

The bound (Wedin 1972, "Perturbation bounds in connection with singular value
decomposition", BIT 12; Stewart & Sun, *Matrix Perturbation Theory*, Thm V.4.4).  If the
SVD we compute is the exact SVD of ``J + E``, the sines of the principal angles between the
top-K left (and right) singular subspaces of ``J`` and of ``J + E`` are at most
``||E||_2 / delta`` with ``delta = s_K(J + E) - s_{K+1}(J)``.  By Weyl, ``s_{K+1}(J)`` is
within ``||E||_2`` of the computed ``s_{K+1}``, so with the computed values
``delta >= s_K - s_{K+1} - ||E||_2``.

The size of ``E`` (``roundoff_factor``).  ``||E||_2 <= c eps ||J||_2 = c eps s_1`` with
``eps`` the unit round-off of the precision ``J`` was computed in (float32: 1.19e-7; the
scan always takes Jacobians in float32) and ``c = 8 + sqrt(d)``, two parts measured on real
blocks (GPT-2, Llama, BERT random-init at d = 64, 256, 768 and the trained embedded tiny
model, against float64 Jacobians and SVDs; ``tests/test_spectral_gap.py`` re-checks it):

* the Jacobian itself: ``||J_32 - J_64||_2`` = 0.8-4.1 ``eps ||J||_2``, whether taken on the
  whole prompt or locally, and not growing with ``d`` (each product is a short chain of
  matrix products with blocked summation);
* the float32 SVD's backward error (LAPACK's ``p(d) eps ||J||``): the largest error of a
  computed singular value was 0.5-0.72 ``sqrt(d) eps ||J||_2`` (4 at d=64, 9 at d=256,
  20 at d=768); by Weyl that is a lower bound on the whole ``||E||_2``.

``8 + sqrt(d)`` is at least 1.8x every measured value.

The flag.  With ``g = (s_K - s_{K+1}) / s_1`` (the *relative gap*) and ``e = c eps``, the
bound on the subspace angle is ``e / (g - e)``; the top-K subspace counts as *undetermined*
when that bound exceeds ``ANGLE_TOL``, i.e. when ``g < e (1 + 1 / ANGLE_TOL)``.
``ANGLE_TOL = 0.01``: moving the top-K vectors by an angle ``theta`` changes the coupling
matrix ``A = U'^T J V'`` by up to ``2 theta ||J||_2``, i.e. the normalized mis-coupling by
O(theta); scores are compared between models at the 0.01 level, so a subspace known only
to 0.01 rad or worse does not support them.  At float32 and d = 768 the flag is raised
below a relative gap of 4.3e-4: ``s_K / s_{K+1}`` below ~1.0004 when ``s_K ~ s_1``, higher
when ``s_K`` is smaller (``s_K / s_{K+1} - 1 = g s_1 / s_{K+1}``).  Random-init GPT-2-small
blocks measured 1.0009-1.016 (relative gaps 7e-4 to 1.4e-2 at K = 10 and 50): rarely
flagged, but not far from it.
"""
from __future__ import annotations

import math

import torch

ANGLE_TOL = 1e-2
JACOBIAN_ROUNDOFF = 8.0     # c = JACOBIAN_ROUNDOFF + sqrt(d), see the module docstring


def unit_roundoff(dtype) -> float:
    """Machine epsilon of the precision a Jacobian was computed in (float32 at least:
    bf16/fp16 models have their Jacobians taken in float32)."""
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return float(torch.finfo(dtype).eps)


def roundoff_factor(d: int) -> float:
    """``c`` in ``||E||_2 <= c eps ||J||_2`` for a ``d x d`` block Jacobian and its SVD."""
    return JACOBIAN_ROUNDOFF + math.sqrt(d)


def relative_gap(S, s_next) -> float:
    """``(s_K - s_{K+1}) / s_1`` from the top-K values ``S`` (descending) and ``s_{K+1}``;
    ``inf`` when nothing is left out (``s_next`` None or nan); 0 for a zero Jacobian (all
    its singular values are equal: every K-dimensional subspace is a top-K subspace)."""
    S = torch.as_tensor(S).detach().double().cpu().numpy()
    if s_next is None or not math.isfinite(float(s_next)):
        return math.inf
    if S[0] == 0:
        return 0.0
    return float((S[-1] - float(s_next)) / S[0])


def min_relative_gap(d: int, eps: float, angle_tol: float = ANGLE_TOL) -> float:
    """The relative gap below which the top-K subspace is undetermined at precision ``eps``."""
    e = roundoff_factor(d) * eps
    return e * (1.0 + 1.0 / angle_tol)


def angle_bound(S, s_next, d: int, eps: float) -> float:
    """Wedin's bound on the sine of the top-K subspace error (``inf`` when the gap is not
    larger than the round-off)."""
    g = relative_gap(S, s_next)
    e = roundoff_factor(d) * eps
    return 0.0 if math.isinf(g) else (e / (g - e) if g > e else math.inf)


def undetermined(S, s_next, d: int, eps: float, angle_tol: float = ANGLE_TOL) -> bool:
    """Whether the top-K subspace is not determined to ``angle_tol`` at precision ``eps``."""
    return bool(relative_gap(S, s_next) < min_relative_gap(d, eps, angle_tol))
