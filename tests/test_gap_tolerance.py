"""The gap-derived tolerance of coupling entries (tests/gap_tolerance.py) against known answers:
matrices with chosen singular values and vectors, and perturbations whose effect is known.

The perturbation that mixes two close singular vectors (``E = eta (u_j v_i^T + u_i v_j^T)``
rotates the pair by ``atan(2 eta / g) / 2``) is the worst case the bound is built for: it must
hold, and be within a small factor of the change it produces (measured 1.4-2.2x).  Random
perturbations of the same norm move the entries much less; the bound holds for them too.
"""
import numpy as np
import pytest

from coupling.measures.coupling_scores import mis_coupling
from gap_tolerance import (EntryTolerance, assert_close_by_gap, bound_from_spectra,
                           depth_tolerance_from_spectra, entry_bound, entry_tolerance,
                           off_diagonal_mean)

D, K = 12, 4


def _orthogonal(rng, d=D):
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


def _scores(J, J_ref):
    """Exact (float64) ``m~`` and ``m`` of ``J`` against the top-K vectors of ``J_ref``."""
    U, _, Vt = np.linalg.svd(J_ref)
    A = U[:, :K].T @ J @ Vt[:K].T
    return np.array([mis_coupling(A, "normalized"), mis_coupling(A, "raw")])


def _close_pair(i, g):
    """Singular values with ``s_i - s_{i+1} = g`` (0-based), the rest well apart."""
    s = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5] + list(np.linspace(0.4, 0.1, D - 6)))
    s[i + 1] = s[i] - g
    return s


@pytest.mark.parametrize("i", [1, 2, 3])       # (3, 4) straddles the top-K boundary
@pytest.mark.parametrize("g", [1e-2, 1e-3])
def test_bound_holds_and_is_tight_for_the_rotation_of_a_close_pair(i, g):
    rng = np.random.default_rng(i)
    Uq, Vq = _orthogonal(rng), _orthogonal(rng)
    s = _close_pair(i, g)
    J_ref = Uq @ np.diag(s) @ Vq.T
    # J weighs the pair so that turning it moves weight off the diagonal: opposite weights
    # inside the top K; across the boundary, vector i+1 coupled into output 0
    M = np.diag(np.full(D, 0.1))
    if i + 1 < K:
        M[i, i], M[i + 1, i + 1] = 2.0, -2.0
    else:
        M[0, i + 1] = M[i + 1, 0] = 2.0
    J = Uq @ M @ Vq.T
    eta = 1e-3 * g
    E = eta * (np.outer(Uq[:, i + 1], Vq[:, i]) + np.outer(Uq[:, i], Vq[:, i + 1]))
    moved = np.abs(_scores(J, J_ref + E) - _scores(J, J_ref))
    b = entry_bound(J, J_ref, K, err=eta / s[0])
    bound = np.array([b.normalized, b.raw])
    assert b.determined
    assert (moved <= bound).all(), (moved, bound)
    assert (bound <= 3 * moved).all(), (moved, bound)       # measured 1.4-2.2x


@pytest.mark.parametrize("g", [1e-1, 1e-2, 1e-3])
def test_bound_holds_for_random_perturbations_of_its_norm(g):
    rng = np.random.default_rng(7)
    Uq, Vq = _orthogonal(rng), _orthogonal(rng)
    s = _close_pair(2, g)
    J_ref = Uq @ np.diag(s) @ Vq.T
    J = J_ref + 0.3 * rng.standard_normal((D, D))
    eta = 1e-3 * g
    b = entry_bound(J, J_ref, K, err=eta / s[0])
    for _ in range(50):
        E, F = rng.standard_normal((2, D, D))
        E *= eta / np.linalg.norm(E, 2)
        F *= eta / s[0] * np.linalg.norm(J, 2) / np.linalg.norm(F, 2)  # J's own round-off too
        moved = np.abs(_scores(J + F, J_ref + E) - _scores(J, J_ref))
        assert (moved <= [b.normalized, b.raw]).all()


def test_a_degenerate_pair_is_undetermined_and_really_moves_the_entry():
    rng = np.random.default_rng(3)
    Uq, Vq = _orthogonal(rng), _orthogonal(rng)
    s = _close_pair(2, 0.0)                      # s_2 = s_3 exactly
    J_ref = Uq @ np.diag(s) @ Vq.T
    M = np.diag(np.full(D, 0.1))
    M[2, 2], M[3, 3] = 2.0, -2.0
    J = Uq @ M @ Vq.T
    eta = 1e-6
    E = eta * (np.outer(Uq[:, 3], Vq[:, 2]) + np.outer(Uq[:, 2], Vq[:, 3]))
    moved = np.abs(_scores(J, J_ref + E) - _scores(J, J_ref))[0]
    assert moved > 1e4 * eta          # turned by 45 degrees: a change of m~ unrelated to eta
    assert not entry_bound(J, J_ref, K, err=eta / s[0]).determined


def test_an_operator_against_its_own_vectors_is_determined_whatever_its_gaps():
    rng = np.random.default_rng(4)
    Uq, Vq = _orthogonal(rng), _orthogonal(rng)
    J = Uq @ np.diag(_close_pair(1, 0.0)) @ Vq.T   # degenerate pair inside the top K
    eta = 1e-6
    b = entry_bound(J, J, K, same=True, err=eta / 3.0)
    assert b.determined
    for _ in range(20):
        E = rng.standard_normal((D, D))
        E *= eta / np.linalg.norm(E, 2)
        assert _scores(J + E, J + E)[0] <= b.normalized     # exactly 0 without round-off


def test_spectra_route_equals_the_matrix_route():
    """From what a scan stores (values, s_{K+1}, m and m~) the same tolerance as from J."""
    rng = np.random.default_rng(5)
    Js = [rng.standard_normal((D, D)) for _ in range(3)]
    svals = [np.linalg.svd(J, compute_uv=False) for J in Js]
    m = np.array([[_scores(a, b) for b in Js] for a in Js])      # (L, L, 2)
    got = depth_tolerance_from_spectra(m[..., 0], m[..., 1], np.stack([v[:K] for v in svals]),
                                       np.array([v[K] for v in svals]), D)
    for a in range(3):
        for b in range(3):
            want = entry_tolerance(Js[a], Js[b], K, same=a == b)
            assert got.normalized[a, b] == pytest.approx(float(want.normalized), rel=1e-9)
            assert got.raw[a, b] == pytest.approx(float(want.raw), rel=1e-9)
            assert got.determined[a, b] == want.determined
    mean = off_diagonal_mean(got)
    assert mean.normalized == pytest.approx(got.normalized[~np.eye(3, dtype=bool)].mean())


def test_the_comparison_reports_and_bounds_what_it_leaves_out(capsys):
    tol = EntryTolerance(np.full(4, 1e-3), np.full(4, 1e-3), np.array([True, True, False, True]))
    ref = np.array([0.5, 0.6, 0.7, np.nan])
    assert assert_close_by_gap(ref + [5e-4, -5e-4, 0.3, np.nan], ref, tol.normalized,
                               tol.determined, "grid") == 1
    assert "grid: 1 of 3 entries left out" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"beyond their gap-derived tolerance.*\(1,\)"):
        assert_close_by_gap(ref + [0, 2e-3, 0, np.nan], ref, tol.normalized, tol.determined, "g")
    with pytest.raises(AssertionError, match="every one of 3 entries is undetermined"):
        assert_close_by_gap(ref, ref, tol.normalized, np.zeros(4, bool), "g")
    with pytest.raises(AssertionError, match="1 of 3 entries undetermined"):
        assert_close_by_gap(ref, ref, tol.normalized, tol.determined, "g", max_left_out=0.2)
    with pytest.raises(AssertionError, match="nan in different entries"):
        assert_close_by_gap(np.array([0.5, np.nan, 0.7, 0.1]), ref, tol.normalized,
                            tol.determined, "g")


def test_no_bound_on_a_coupling_matrix_that_round_off_can_cancel():
    """``||A||_F`` within twice the perturbation of ``A``: ``m~`` can be anything in [0, 1]."""
    b = bound_from_spectra(1.0, [1.0, 0.5, 0.25, 0.1, 0.05], 1e-9, K, D, err=1e-6)
    assert b.normalized == 1.0
