"""Known-answer tests for coupling matrices and mis-coupling (coupling/measures/coupling_grids.py)."""
import math

import numpy as np
import pytest
import torch

from coupling.jacobian.linop import LinearOperator
from coupling.measures.coupling_grids import (context_coupling_fixed_input,
                                              context_coupling_fixed_output, depth_coupling,
                                              depth_coupling_factored, pairwise_coupling,
                                              token_grid_pairs, token_self_coupling)
from coupling.measures.coupling_scores import (coupling_matrix, coupling_matrix_factored,
                                               mean_off_diagonal, mis_coupling, nan_off_diagonal)


class LowRankPlusDiag(LinearOperator):
    """A real matrix-free operator ``B C + diag(g)``, counting products (columns)."""

    def __init__(self, B, C, g):
        self.B, self.C, self.g = B, C, g
        self.shape = (B.shape[0], C.shape[1])
        self.dtype = B.dtype
        self.calls, self.columns = 0, 0

    def dense(self):
        return self.B @ self.C + torch.diag(self.g)

    def _matmat(self, M):
        self.calls += 1
        self.columns += M.shape[1]
        return self.B @ (self.C @ M) + self.g[:, None] * M

    def _rmatmat(self, M):
        return self.C.T @ (self.B.T @ M) + self.g[:, None] * M


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orth(d, seed, dtype=torch.float64):
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=dtype))
    return Q


def _svd(J):
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    return U, S, Vh.T


def _random_op(d, seed, dtype=torch.float64):
    g = _gen(seed)
    return LowRankPlusDiag(torch.randn(d, 3, generator=g, dtype=dtype),
                           torch.randn(3, d, generator=g, dtype=dtype),
                           torch.rand(d, generator=g, dtype=dtype) + 0.5)


# --------------------------------------------------------------------------- coupling_matrix
def test_coupling_matrix_equals_dense_product():
    d, k = 12, 4
    J = torch.randn(d, d, generator=_gen(0), dtype=torch.float64)
    U, S, V = _svd(torch.randn(d, d, generator=_gen(1), dtype=torch.float64))
    A = coupling_matrix(J, U, V, k)
    assert A.shape == (k, k) and A.dtype == torch.float64
    torch.testing.assert_close(A, U[:, :k].T @ J @ V[:, :k], rtol=1e-12, atol=1e-12)
    # k=None uses every reference vector
    torch.testing.assert_close(coupling_matrix(J, U, V), U.T @ J @ V, rtol=1e-12, atol=1e-12)


def test_operator_path_equals_dense_path_and_uses_k_products():
    d, k = 10, 3
    op = _random_op(d, 2)
    U, S, V = _svd(torch.randn(d, d, generator=_gen(3), dtype=torch.float64))
    A_op = coupling_matrix(op, U, V, k)
    A_dense = coupling_matrix(op.dense(), U, V, k)
    torch.testing.assert_close(A_op, A_dense, rtol=1e-12, atol=1e-12)
    assert (op.calls, op.columns) == (1, k)


def test_coupling_matrix_rectangular_and_float32():
    J = torch.randn(7, 5, generator=_gen(4))
    U, S, V = _svd(torch.randn(7, 5, generator=_gen(5)))
    A = coupling_matrix(J, U, V, 2)
    assert A.dtype == torch.float32 and A.shape == (2, 2)
    torch.testing.assert_close(A, U[:, :2].T @ J @ V[:, :2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="J is"):
        coupling_matrix(J.T, U, V, 2)
    with pytest.raises(ValueError, match="exceeds"):
        coupling_matrix(J, U, V, 6)


def test_factored_matches_exact_within_tail_bound():
    # J with decaying spectrum s_i = 2^-i; rank-r factors drop the tail s_{r+1}, ...
    d, r, k = 40, 10, 5
    s = 2.0 ** -torch.arange(d, dtype=torch.float64)
    J = _orth(d, 6) @ torch.diag(s) @ _orth(d, 7).T
    U, S, V = _svd(J)
    Ur, Vr = _svd(torch.randn(d, d, generator=_gen(8), dtype=torch.float64))[0::2]
    exact = coupling_matrix(J, Ur, Vr, k)
    approx = coupling_matrix_factored(U[:, :r], S[:r], V[:, :r], Ur, Vr, k)
    err = torch.linalg.matrix_norm(exact - approx, ord=2).item()
    # stated tolerance: ||A_exact - A_factored||_2 <= s_{r+1} = 2^-10 (|| U'^T E V' || <= ||E||)
    assert err <= S[r].item() * (1 + 1e-9)
    assert err < 1e-3 * torch.linalg.matrix_norm(exact).item()
    # full factors -> exact
    full = coupling_matrix_factored(U, S, V, Ur, Vr, k)
    torch.testing.assert_close(full, exact, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ mis_coupling
def test_mis_coupling_hand_computed():
    A = np.array([[1.0, 2.0], [0.0, 3.0]])
    assert mis_coupling(A, "raw") == pytest.approx(2.0)
    assert mis_coupling(A, "normalized") == pytest.approx(2.0 / math.sqrt(14.0))
    # released variants: |A| - diag(s) = [[0, 1], [0, 0]] -> Frobenius norm 1
    B = np.array([[-2.0, 1.0], [0.0, 1.0]])
    s = np.array([2.0, 1.0, 0.5])  # more than K values: the top K=2 are used
    assert mis_coupling(B, "abs_l2", s=s) == pytest.approx(1.0 / math.sqrt(5.0))
    assert mis_coupling(B, "abs_l1", s=s) == pytest.approx(1.0 / 3.0)


def test_mis_coupling_batch_matches_loop_and_zero_is_nan():
    A = np.random.default_rng(0).normal(size=(3, 2, 4, 4))
    s = np.abs(np.random.default_rng(1).normal(size=(3, 2, 4)))
    for v in ("raw", "normalized"):
        batch = mis_coupling(torch.from_numpy(A), v)
        assert batch.shape == (3, 2)
        assert batch[2, 1] == pytest.approx(mis_coupling(A[2, 1], v))
    batch = mis_coupling(A, "abs_l1", s=s)
    assert batch[1, 0] == pytest.approx(mis_coupling(A[1, 0], "abs_l1", s=s[1, 0]))
    assert np.isnan(mis_coupling(np.zeros((3, 3)), "normalized"))
    assert mis_coupling(np.zeros((3, 3)), "raw") == 0.0
    assert np.isnan(mis_coupling(np.eye(2), "abs_l1", s=[0.0, 0.0]))


def test_mis_coupling_bad_input():
    with pytest.raises(ValueError, match="unknown mis-coupling variant"):
        mis_coupling(np.eye(2), "frobenius")
    with pytest.raises(ValueError, match="needs s"):
        mis_coupling(np.eye(2), "abs_l2")
    with pytest.raises(ValueError, match="square"):
        mis_coupling(np.ones((2, 3)))


def test_self_coupling_is_zero_for_every_variant():
    J = torch.randn(9, 9, generator=_gen(9), dtype=torch.float64)
    U, S, V = _svd(J)
    A = coupling_matrix(J, U, V, 5)
    torch.testing.assert_close(torch.diag(A), S[:5])
    for v in ("raw", "normalized"):
        assert mis_coupling(A, v) < 1e-12
    for v in ("abs_l2", "abs_l1"):
        assert mis_coupling(A, v, s=S) < 1e-12


# ----------------------------------------------------------------------------------- grids
def _shared_family(d, L, seed):
    """J^l = Q diag(s_l) P^T: common singular vectors, different descending spectra."""
    Q, P = _orth(d, seed), _orth(d, seed + 1)
    spectra = [torch.linspace(3.0 + l, 0.1, d, dtype=torch.float64) ** (1 + 0.3 * l)
               for l in range(L)]
    return [Q @ torch.diag(s) @ P.T for s in spectra]


def test_shared_singular_vectors_are_perfectly_coupled():
    Js = _shared_family(d=16, L=4, seed=10)
    out = depth_coupling(Js, [_svd(J) for J in Js], k=6, variants=("normalized", "raw"))
    assert out["normalized"].shape == (4, 4)
    assert np.abs(out["normalized"]).max() < 1e-10
    assert np.abs(out["raw"]).max() < 1e-10
    assert mean_off_diagonal(out["normalized"]) < 1e-10


def test_independent_random_jacobians_are_not_coupled():
    d, L, k = 40, 4, 8
    Js = [torch.randn(d, d, generator=_gen(20 + l), dtype=torch.float64) for l in range(L)]
    m = depth_coupling(Js, [_svd(J) for J in Js], k=k, variants=("normalized",))["normalized"]
    off = m[~np.eye(L, dtype=bool)]
    assert np.all(np.abs(np.diag(m)) < 1e-10)
    # a random k x k matrix has (k^2 - k) / k^2 of its energy off the diagonal -> ~0.94
    assert off.min() > 0.8


def test_depth_coupling_convention_one_product_per_layer_and_abs_uses_row_s():
    d, L, k = 10, 3, 4
    ops = [_random_op(d, 30 + l) for l in range(L)]
    svds = [_svd(op.dense()) for op in ops]
    out = depth_coupling(ops, svds, k, variants=("normalized", "abs_l2"), return_matrices=True)
    assert out["A"].shape == (L, L, k, k)
    for l in range(L):
        assert (ops[l].calls, ops[l].columns) == (1, L * k)  # one batched product per layer
        for lp in range(L):
            U, _, V = svds[lp]
            ref = (U[:, :k].T @ ops[l].dense() @ V[:, :k]).numpy()
            np.testing.assert_allclose(out["A"][l, lp], ref, rtol=1e-10, atol=1e-12)
            assert out["normalized"][l, lp] == pytest.approx(mis_coupling(ref))
            assert out["abs_l2"][l, lp] == pytest.approx(mis_coupling(ref, "abs_l2", s=svds[l][1]))
    # chunked references give the same grid
    again = depth_coupling(ops, svds, k, variants=("normalized",), refs_per_product=2)
    np.testing.assert_allclose(again["normalized"], out["normalized"], rtol=1e-12, atol=1e-14)


def test_depth_coupling_float32_operators():
    Js = [J.float() for J in _shared_family(d=16, L=3, seed=40)]
    out = depth_coupling(Js, [_svd(J) for J in Js], k=4, return_matrices=True)
    assert out["A"].dtype == np.float64  # scores as float64; products ran in float32
    assert np.abs(out["normalized"]).max() < 1e-5


def test_factored_depth_coupling_equals_exact_with_full_factors():
    Js = [torch.randn(8, 8, generator=_gen(50 + l), dtype=torch.float64) for l in range(3)]
    svds = [_svd(J) for J in Js]
    exact = depth_coupling(Js, svds, 3, variants=("normalized", "abs_l1"), return_matrices=True)
    fact = depth_coupling_factored(svds, 3, variants=("normalized", "abs_l1"), return_matrices=True)
    for key in ("A", "normalized", "abs_l1"):
        np.testing.assert_allclose(fact[key], exact[key], rtol=1e-10, atol=1e-12)


def test_pairwise_rectangular_grid_with_missing_entries():
    d, k = 8, 2
    ops = [torch.randn(d, d, generator=_gen(60 + i), dtype=torch.float64) for i in range(2)]
    refs = [_svd(torch.randn(d, d, generator=_gen(70 + j), dtype=torch.float64)) for j in range(3)]
    out = pairwise_coupling([ops[0], None, ops[1]], [refs[0], refs[1], None, refs[2]], k,
                            variants=("raw",))
    m = out["raw"]
    assert m.shape == (3, 4)
    assert np.isnan(m[1]).all() and np.isnan(m[:, 2]).all()
    expected = mis_coupling(refs[2][0][:, :k].T @ ops[1] @ refs[2][2][:, :k], "raw")
    assert m[2, 3] == pytest.approx(expected)
    with pytest.raises(ValueError, match="need s_a"):
        pairwise_coupling(ops, refs, k, variants=("abs_l1",))
    with pytest.raises(ValueError, match="exceeds"):
        pairwise_coupling(ops, refs, 9)


def test_token_self_coupling_diagonal_zero_at_same_layer():
    n, d = 4, 6
    ops = [torch.randn(d, d, generator=_gen(80 + t), dtype=torch.float64) for t in range(n)]
    m = token_self_coupling(ops, [_svd(J) for J in ops], k=3)["normalized"]
    assert m.shape == (n, n)
    assert np.abs(np.diag(m)).max() < 1e-12
    assert np.all(m[~np.eye(n, dtype=bool)] > 0.3)


def _causal_pairs(n, d, seed):
    return {(t1, t2): torch.randn(d, d, generator=_gen(seed + 10 * t1 + t2), dtype=torch.float64)
            for t2 in range(n) for t1 in range(t2 + 1)}


def test_context_coupling_fixed_input_indices_and_nan():
    n, d, k, t1 = 4, 6, 2, 1
    Jl, Jlp = _causal_pairs(n, d, 100), _causal_pairs(n, d, 200)
    svds_lp = {key: _svd(J) for key, J in Jlp.items()}
    m = context_coupling_fixed_input(Jl, svds_lp, t1, k, variants=("raw",))["raw"]
    assert m.shape == (n, n)
    assert np.isnan(m[0]).all() and np.isnan(m[:, 0]).all()   # t2 < t1: unused
    assert np.isfinite(m[1:, 1:]).all()
    U, _, V = svds_lp[(t1, 2)]
    assert m[3, 2] == pytest.approx(mis_coupling(U[:, :k].T @ Jl[(t1, 3)] @ V[:, :k], "raw"))


def test_context_coupling_fixed_output_indices_and_nan():
    n, d, k, t2 = 4, 6, 2, 2
    Jl, Jlp = _causal_pairs(n, d, 300), _causal_pairs(n, d, 400)
    svds_lp = {key: _svd(J) for key, J in Jlp.items()}
    m = context_coupling_fixed_output(Jl, svds_lp, t2, k, variants=("raw",))["raw"]
    assert m.shape == (n, n)
    assert np.isnan(m[3]).all() and np.isnan(m[:, 3]).all()   # t1 > t2: unused
    assert np.isfinite(m[:3, :3]).all()
    U, _, V = svds_lp[(1, t2)]
    assert m[0, 1] == pytest.approx(mis_coupling(U[:, :k].T @ Jl[(0, t2)] @ V[:, :k], "raw"))
    with pytest.raises(ValueError, match="keyed by"):
        context_coupling_fixed_output({0: Jl[(0, 0)]}, svds_lp, t2, k)


def test_mean_off_diagonal_ignores_diagonal_and_nan():
    M = np.array([[0.0, 1.0, np.nan], [3.0, 0.0, 5.0], [7.0, 9.0, 100.0]])
    assert mean_off_diagonal(M) == pytest.approx((1 + 3 + 5 + 7 + 9) / 5)
    assert np.isnan(mean_off_diagonal(np.full((2, 2), np.nan)))
    np.testing.assert_allclose(mean_off_diagonal(np.stack([M, 2 * M])), [5.0, 10.0])


def test_nan_off_diagonal_counts_what_the_mean_leaves_out():
    M = np.array([[np.nan, 1.0, np.nan], [3.0, 0.0, 5.0], [7.0, np.inf, 100.0]])
    R = np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 5.0], [7.0, 9.0, 100.0]])
    assert nan_off_diagonal(M) == 2                 # (0, 2), (2, 1); the diagonal is not counted
    assert nan_off_diagonal(M, R) == 3              # plus (1, 0) of the second grid
    assert nan_off_diagonal(np.zeros((4, 4))) == 0
    with pytest.raises(ValueError, match="square"):
        nan_off_diagonal(np.zeros((2, 3)))


def test_token_grid_pairs_are_what_the_grids_read():
    n = 5
    causal = token_grid_pairs(n)
    assert len(causal) == 3 * n - 3 and all(t1 <= t2 for t1, t2 in causal)
    assert {(t, t) for t in range(n)} | {(0, t) for t in range(n)} | \
        {(t, n - 1) for t in range(n)} == causal
    assert (3, 1) in token_grid_pairs(n, 3, 1, causal=False)
    assert (3, 1) not in token_grid_pairs(n, 3, 1)        # t1 > t2: zero in a causal block


def test_a_block_that_does_nothing_gives_counted_nan_entries():
    """A GPT-2 block with its output projections zeroed: f^2 = 0, so J^2 = 0 and its row of
    the normalized grid is 0/0 (nan) against every other layer.  The per-prompt mean is over
    the remaining pairs and the summary says how many were left out; J^2's top-K subspace is
    arbitrary (all its singular values are 0) and flagged as such."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.model.loading import LoadedModel
    from coupling.model.zoo import build_random, random_inputs, small_config
    from coupling.settings.scan_settings import ScanSettings
    L = 4
    cfg = small_config("gpt2", n_layers=L, d=32)
    model = build_random(cfg, seed=3)
    block = model.transformer.h[1]
    for proj in (block.attn.c_proj, block.mlp.c_proj):
        proj.weight.zero_()
        proj.bias.zero_()
    lm = LoadedModel(model, None, cfg, {"n_layers": L})
    ids = random_inputs("gpt2", n_tokens=6)["input_ids"]
    res = analyze_prompt(lm, ids, ScanSettings(k=3, measures=("depth",)))
    grid = res.depth_normalized
    off = ~np.eye(L, dtype=bool)
    assert np.isnan(grid[1][off[1]]).all() and np.isfinite(np.delete(grid, 1, 0)).all()
    assert res.summary["depth_nan_entries"] == L - 1
    assert res.summary["depth_mis_coupling_mean"] == pytest.approx(np.nanmean(grid[off]))
    assert list(res.spectral_flags["undetermined"]) == [False, True, False, False]
