"""How far apart two float32 computations of one coupling number may be: from the conditioning
of what they compare (the gaps of the reference spectrum), never from one machine's round-off.

Used by every test that compares coupling entries, grids or spectra between two computations
(local against whole-prompt Jacobians, the matrix-free against the dense route, Ray against
the local scan, ...).  Both computations are float32 round-offs of the same exact numbers; the
helper bounds how far each can be from the exact value and compares them with the sum.

The model of round-off (``coupling.spectrum.spectral_gap``): a float32 Jacobian ``J`` and its
SVD are the exact Jacobian and SVD of ``J + E``, ``||E||_2 <= e s_1(J)``, ``e = c eps``,
``c = 8 + sqrt(d)``.

Derivation of the bound on one entry
------------------------------------
Entry = ``m~(A)`` or ``m(A)`` with ``A = U'^T J V'``: ``J`` the Jacobian being coupled,
``U', V'`` the top-K singular vectors of the reference ``J'`` (all ``d x d``).

1. *Each singular vector, not only the top-K subspace.*  ``m~`` is not invariant under a
   rotation of ``U', V'`` inside the top-K subspace (``A -> Q^T A Q`` moves weight on and off
   the diagonal), so every vector ``i <= K`` must be determined: its separation from the other
   singular values matters, not only ``s_K - s_{K+1}``.  Wedin's sin-theta theorem
   (Stewart & Sun, *Matrix Perturbation Theory*, Thm V.4.4; for square matrices the separation
   condition alone suffices) for the 1-dimensional triplet ``i`` of ``J' + E'`` against the
   other ``d - 1`` triplets of ``J'``: with residuals ``r = -E' v~_i``, ``q = -E'^T u~_i``,
   ``sin^2 phi_i + sin^2 theta_i <= (||r||^2 + ||q||^2) / delta_i^2 <= 2 ||E'||^2 / delta_i^2``,
   ``delta_i = min_{j != i} |s~_i - s_j|``.  From the computed values ``s^`` of a reference
   (itself within ``||E'||`` of the exact ones, Weyl) ``delta_i >= g_i - 3 ||E'||``,
   ``g_i = min(s^_{i-1} - s^_i, s^_i - s^_{i+1})`` (``s^_0 = inf``; ``s^_{K+1}`` enters).
   With signs chosen so that ``u_i^T u~_i >= 0`` (``v_i`` follows), ``||u~ - u||^2 =
   2 - 2 cos phi <= 2 sin^2 phi``, so ``||dU||_F^2 + ||dV||_F^2 <= 4 ||E'||^2 sum_i delta_i^-2``
   and ``||dU||_F + ||dV||_F <= 2 sqrt(2) ||E'|| sqrt(sum_i delta_i^-2)`` =: ``w``.
2. *The coupling matrix.*  Exactly,
   ``A~ - A = dU^T J~ V~' + U'^T E V~' + U'^T J dV``, so
   ``||A~ - A||_F <= a := (s_1(J) + ||E||) w + sqrt(K) ||E||``  (``||E|| <= e s_1(J)``).
   This is the ``(2 theta + theta^2) ||J||`` of a first look with the second-order term
   absorbed exactly (``J~ V~'`` instead of ``J V'``).
3. *The scores.*  ``m = ||off(A)||_F`` moves by at most ``||off(A~ - A)||_F <= a``.
   ``m~(A) = ||off(A)||_F / ||A||_F`` has gradient norm ``sqrt(1 - m~^2) / ||A||_F <= 1/||A||_F``,
   so along the segment from ``A`` to ``A~`` (where ``||A|| >= N - a``)
   ``|m~(A~) - m~(A)| <= a / (N - a)``; ``N >= N^ - a`` for the computed reference ``N^``.
4. *Two computations*, each within the bound of the exact value: the tolerance on their
   difference is twice it: ``2a`` for ``m``, ``2a / (N^ - 2a)`` for ``m~`` (at most 1, the
   range of ``m~``).
5. *An operator against its own vectors* (the diagonal of a depth grid, ``J = J'``): ``A~ =
   diag(S~) - U~^T E V~`` whatever the gaps, so ``a = sqrt(K) ||E||``: determined always.
6. *Singular values* (Weyl): ``|s~_i - s_i| <= ||E||``; two computations: ``2 e s_1``.
7. *Means* (a per-prompt score, a grid averaged over traced tokens): the mean of the terms'
   tolerances.

A pair is *undetermined* when some ``delta_i <= 0`` or the angle bound ``sqrt(2) ||E'|| /
delta_i`` of some vector reaches ``ANGLE_TOL`` (the project's flag, ``spectral_gap``, applied
to every vector); an entry built on one (a mean: on any) is left out of the comparison and
counted.  :func:`assert_close_by_gap` prints the count and fails when more than
``max_left_out`` of the entries, or all of them, are left out.

How tight.  For the perturbation the bound is built for (one that turns a close pair of
singular vectors) it is 1.4-2.2x the change it causes (tests/test_gap_tolerance.py).  Real
round-off is not that perturbation: on the d = 32 test models the tolerances are 1e-3 to
1e-2 on entries between different Jacobians (4e-6 on a depth grid's diagonal) and the
measured differences between the scan's routes 5e-4 to 4e-2 of them.  A wrong pair, layer or
token moves entries by 0.1 and more and fails; kernels that round differently do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from coupling.spectrum.spectral_gap import ANGLE_TOL, roundoff_factor, unit_roundoff

EPS32 = unit_roundoff(torch.float32)


def _dense(J) -> np.ndarray:
    if isinstance(J, torch.Tensor):
        J = J.detach().cpu().double().numpy()
    return np.asarray(J, dtype=np.float64)


def relative_error(d: int, eps: float = EPS32) -> float:
    """``e``: ``||E||_2 <= e s_1`` for a ``d x d`` Jacobian and its SVD at precision ``eps``."""
    return roundoff_factor(d) * eps


def vector_separations(s, k: int, err: float) -> np.ndarray:
    """``delta_i >= g_i - 3 ||E||`` for the top ``k`` singular vectors of a matrix whose computed
    singular values (descending, at least ``k + 1`` of them unless ``k = d``) are ``s``."""
    s = np.asarray(s, dtype=np.float64)
    padded = np.concatenate([[np.inf], s[:k + 1], [-np.inf] if len(s) <= k else []])
    gaps = np.minimum(padded[:k] - padded[1:k + 1], padded[1:k + 1] - padded[2:k + 2])
    return gaps - 3.0 * err


def vector_angles(s, k: int, err: float) -> np.ndarray:
    """Wedin's bound on the sine of each top-``k`` singular vector's error (``inf`` when the
    vector is not separated from its neighbours by more than the round-off)."""
    delta = vector_separations(s, k, err)
    with np.errstate(divide="ignore"):
        return np.where(delta > 0, math.sqrt(2.0) * err / np.maximum(delta, 1e-300), np.inf)


@dataclass
class EntryTolerance:
    """Bounds on entries (one computation from the exact value, or two from each other)."""

    normalized: np.ndarray   # on m~
    raw: np.ndarray          # on m
    determined: np.ndarray   # bool: every singular vector the entry is built on is determined

    @staticmethod
    def mean(terms: list) -> "EntryTolerance":
        """Of entries that are means of the terms' entries (e.g. over traced tokens)."""
        return EntryTolerance(np.mean([t.normalized for t in terms], axis=0),
                              np.mean([t.raw for t in terms], axis=0),
                              np.all([t.determined for t in terms], axis=0))


def bound_from_spectra(s1_J: float, s_ref, norm_A: float, k: int, d: int, *,
                       same: bool = False, eps: float = EPS32, err: float | None = None,
                       computations: int = 1) -> EntryTolerance:
    """Steps 1-5 from numbers only: ``s1_J = ||J||_2``, ``s_ref`` the reference's top singular
    values (``k + 1`` of them: ``s_{K+1}`` enters), ``norm_A = ||A||_F`` as computed.
    ``computations=2``: the tolerance on the difference of two computations."""
    e = relative_error(d, eps) if err is None else err
    s_ref = np.asarray(s_ref, dtype=np.float64)
    E_J = e * s1_J
    if same:
        a, determined = math.sqrt(k) * E_J, True
    else:
        E_ref = e * s_ref[0]
        delta = vector_separations(s_ref, k, E_ref)
        determined = bool((delta > 0).all() and (vector_angles(s_ref, k, E_ref) < ANGLE_TOL).all())
        w = 2.0 * math.sqrt(2.0) * E_ref * math.sqrt(float(np.sum(1.0 / delta ** 2))) \
            if (delta > 0).all() else math.inf
        a = (s1_J + E_J) * w + math.sqrt(k) * E_J
    c = computations
    tol_n = min(1.0, c * a / (norm_A - 2 * a)) if norm_A > 2 * a else 1.0
    return EntryTolerance(np.float64(tol_n), np.float64(c * a), np.bool_(determined))


def entry_bound(J, J_ref, k: int, **kw) -> EntryTolerance:
    """:func:`bound_from_spectra` of ``m~`` and ``m`` of ``J`` against the top-``k`` singular
    vectors of ``J_ref`` (reference float32 Jacobians, read in float64)."""
    J, J_ref = _dense(J), _dense(J_ref)
    U, s, Vt = np.linalg.svd(J_ref)
    A = U[:, :k].T @ J @ Vt[:k].T
    return bound_from_spectra(float(np.linalg.norm(J, 2)), s[:k + 1], float(np.linalg.norm(A)),
                              k, J.shape[-1], **kw)


def entry_tolerance(J, J_ref, k: int, **kw) -> EntryTolerance:
    """Tolerance on the difference of two computations: twice :func:`entry_bound` (step 4)."""
    return entry_bound(J, J_ref, k, computations=2, **kw)


def grid_tolerance(rows, refs, k: int, **kw) -> EntryTolerance:
    """Entry ``[i, j]``: ``rows[i]`` against the vectors of ``refs[j]`` (``None``: not computed,
    tolerance 0 and not counted).  Where ``rows[i] is refs[j]`` the own-vector bound applies."""
    shape = (len(rows), len(refs))
    out = EntryTolerance(np.zeros(shape), np.zeros(shape), np.ones(shape, bool))
    for i, J in enumerate(rows):
        for j, R in enumerate(refs):
            if J is None or R is None:
                continue
            t = entry_tolerance(J, R, k, same=J is R, **kw)
            out.normalized[i, j], out.raw[i, j], out.determined[i, j] = \
                t.normalized, t.raw, t.determined
    return out


def depth_tolerance_from_spectra(normalized, raw, S, s_next, d: int,
                                 computations: int = 2) -> EntryTolerance:
    """Tolerances of depth grids ``(..., L, L)`` from what a scan stores: the grids (``||A||_F
    = m / m~``), the traced token's top-K values ``S`` ``(..., L, K)`` and ``s_{K+1}``
    ``(..., L)`` (``singular_values`` / ``sv_next``).  Only for ``--token last`` (the values
    stored are the last token's)."""
    normalized, raw = np.asarray(normalized, np.float64), np.asarray(raw, np.float64)
    S, s_next = np.asarray(S, np.float64), np.asarray(s_next, np.float64)
    out = EntryTolerance(np.zeros(normalized.shape), np.zeros(normalized.shape),
                         np.ones(normalized.shape, bool))
    k = S.shape[-1]
    for idx in np.ndindex(*normalized.shape):
        *p, l, lp = idx
        p = tuple(p)
        if not np.isfinite(normalized[idx]):
            continue
        same = l == lp
        N = float(np.linalg.norm(S[p + (l,)])) if same else float(raw[idx] / normalized[idx])
        ref = np.append(S[p + (lp,)], s_next[p + (lp,)])
        t = bound_from_spectra(float(S[p + (l, 0)]), ref[np.isfinite(ref)], N, k, d, same=same,
                               computations=computations)
        out.normalized[idx], out.raw[idx], out.determined[idx] = t.normalized, t.raw, t.determined
    return out


def off_diagonal_mean(tol: EntryTolerance) -> EntryTolerance:
    """Of the per-prompt score (the mean of ``m~`` over ``l != l'``) from its grid's entries."""
    L = tol.normalized.shape[-1]
    off = ~np.eye(L, dtype=bool)
    return EntryTolerance(tol.normalized[..., off].mean(-1), tol.raw[..., off].mean(-1),
                          tol.determined[..., off].all(-1))


def singular_value_tolerance(S, d: int, eps: float = EPS32) -> np.ndarray:
    """Step 6 (Weyl) for singular values ``S`` ``(..., K)``: ``2 e s_1`` for each of them."""
    S = np.asarray(S, np.float64)
    return np.broadcast_to(2.0 * relative_error(d, eps) * S[..., :1], S.shape)


def assert_close_by_gap(got, ref, tol, determined, what: str, max_left_out: float = 0.5,
                        require_one: bool = True) -> int:
    """``|got - ref| <= tol`` on the determined entries; ``nan`` in the same places.

    Entries built on undetermined pairs are left out and counted; the count is printed and
    must be at most ``max_left_out`` of the finite entries, and (``require_one``) at least one
    entry is compared.  Returns the count left out."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    tol = np.broadcast_to(np.asarray(tol, np.float64), ref.shape)
    determined = np.broadcast_to(np.asarray(determined, bool), ref.shape)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: nan in different entries"
    finite = np.isfinite(ref)
    compared = finite & determined
    left_out = int((finite & ~determined).sum())
    print(f"{what}: {left_out} of {int(finite.sum())} entries left out (undetermined pairs)")
    assert compared.any() or not require_one, \
        f"{what}: every one of {int(finite.sum())} entries is undetermined"
    assert left_out <= max_left_out * finite.sum(), \
        f"{what}: {left_out} of {int(finite.sum())} entries undetermined (> {max_left_out:.0%})"
    diff = np.abs(got - ref)
    bad = compared & (diff > tol)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} entries differ beyond their gap-derived "
                             f"tolerance; e.g. {idx}: |{got[idx]:.6g} - {ref[idx]:.6g}| = "
                             f"{diff[idx]:.3g} > {tol[idx]:.3g}")
    return left_out


# ------------------------------------------------------------------------------------------
# The tolerances of a prompt's grids, from its whole-prompt Jacobians
# ------------------------------------------------------------------------------------------
def _jacobians(lm, record, layer, settings, pairs) -> dict:
    """``{(t1, t2): J^layer_{t1 t2}}`` (float32, whole prompt: the reference function)."""
    from coupling.analysis.steps import layer_function
    from coupling.jacobian.block_jacobian import exact_jacobians

    f = layer_function(record, layer, settings, lm.model)
    X = record.call(layer).input.float()
    by_out: dict = {}
    for t1, t2 in sorted(pairs):
        by_out.setdefault(t2, []).append(t1)
    out = {}
    for t2, t1s in by_out.items():
        out.update({(t1, t2): J for t1, J in zip(t1s, exact_jacobians(f, X, t2, t1s))})
    return out


def depth_tolerance(lm, record, settings) -> EntryTolerance:
    """Tolerances of the ``L x L`` depth grids (``m~`` and ``m``) of one prompt, averaged over
    the traced tokens as the scan averages the grids."""
    from coupling.analysis.steps import traced_tokens

    k = min(settings.k, record.hidden_states.shape[-1])
    tokens = traced_tokens(record.n_tokens, settings)
    per_layer = [_jacobians(lm, record, l, settings, pairs={(t, t) for t in tokens})
                 for l in range(1, record.n_layers + 1)]
    return EntryTolerance.mean([grid_tolerance([J[(t, t)] for J in per_layer],
                                               [J[(t, t)] for J in per_layer], k)
                                for t in tokens])


def token_tolerance(lm, record, settings) -> dict:
    """``{grid name: EntryTolerance}`` of the three token-wise grids of one prompt."""
    from coupling.analysis.steps import token_layers
    from coupling.measures.coupling_grids import token_grid_pairs
    from coupling.model.hf_call import is_causal

    n = record.n_tokens
    l, lp = token_layers(settings, record.n_layers)
    k = min(settings.k, record.hidden_states.shape[-1])
    causal = is_causal(record.call(l))
    pairs = token_grid_pairs(n, 0, n - 1, causal)
    rows = _jacobians(lm, record, l, settings, pairs=pairs)
    refs = rows if lp == l else _jacobians(lm, record, lp, settings, pairs=pairs)
    ok = lambda t1, t2: (t1, t2) in pairs    # noqa: E731  (causal: t1 <= t2 only)
    pick = lambda J, keys: [J[p] if ok(*p) else None for p in keys]  # noqa: E731
    grids = {"self": [(t, t) for t in range(n)], "fixed_input": [(0, t) for t in range(n)],
             "fixed_output": [(t, n - 1) for t in range(n)]}
    return {name: grid_tolerance(pick(rows, keys), pick(refs, keys), k)
            for name, keys in grids.items()}


# ------------------------------------------------------------------------------------------
# Two scan outputs of the same model and prompts (Ray against local, ...)
# ------------------------------------------------------------------------------------------
SCORES = {"depth_mis_coupling_mean": "normalized", "depth_mis_coupling_raw_mean": "raw"}


def assert_same_scan(got, ref, atol: float = 1e-6, ignore=()):
    """``got`` (a scan folder or result) holds ``ref``'s numbers: the depth grids, spectra
    and per-prompt scores within their gap-derived tolerances (from ``ref``'s stored spectra,
    ``--token last``), every other column of summary/layers (but ``ignore``) to ``atol``."""
    import pandas as pd

    from coupling.results.scan_output import read_scan_output

    got = read_scan_output(got) if not hasattr(got, "depth") else got
    assert ref.manifest["config"].get("token", "last") == "last", "spectra are the last token's"
    assert list(got.depth["prompt_ids"]) == list(ref.depth["prompt_ids"])
    d, (P, L, _) = ref.manifest["model"]["d_model"], ref.depth["singular_values"].shape
    nxt = ref.layers.set_index(["prompt_id", "layer"])["sv_next"]
    s_next = np.array([[nxt[(p, l)] for l in range(1, L + 1)] for p in ref.depth["prompt_ids"]])
    tol = depth_tolerance_from_spectra(ref.depth["normalized"], ref.depth["raw"],
                                       ref.depth["singular_values"], s_next, d)
    for key in ("normalized", "raw"):
        assert_close_by_gap(got.depth[key], ref.depth[key], getattr(tol, key), tol.determined,
                            f"depth {key}")
    sv_tol = singular_value_tolerance(ref.depth["singular_values"], d)
    assert_close_by_gap(got.depth["singular_values"], ref.depth["singular_values"], sv_tol, True,
                        "singular values")
    # a prompt's score is a mean over its grid (compared entry by entry above): compared where
    # every entry is determined
    score = off_diagonal_mean(tol)
    order = got.summary.set_index("prompt_id").loc[list(ref.summary.prompt_id)]
    for col, key in SCORES.items():
        assert_close_by_gap(order[col].to_numpy(), ref.summary[col].to_numpy(),
                            getattr(score, key), score.determined, col, max_left_out=1.0,
                            require_one=False)
    drop = lambda df, cols: df.drop(columns=[*cols, *ignore], errors="ignore")  # noqa: E731
    pd.testing.assert_frame_equal(drop(got.summary, SCORES), drop(ref.summary, SCORES),
                                  rtol=0, atol=atol)
    sv = [c for c in ref.layers if c.startswith("sv_") and c not in ("sv_gap_undetermined",)]
    s1 = ref.layers["sv_1"].to_numpy()
    for c in sv:
        t = 2 * relative_error(d) * s1
        if c == "sv_gap":       # s_K / s_{K+1}: each value moves by t
            t = t * (1 + ref.layers[c].to_numpy()) / (ref.layers["sv_next"].to_numpy() - t)
        assert_close_by_gap(got.layers[c].to_numpy(), ref.layers[c].to_numpy(),
                            np.nan_to_num(t), True, f"layers {c}")
    pd.testing.assert_frame_equal(drop(got.layers, sv), drop(ref.layers, sv), rtol=0, atol=atol)
