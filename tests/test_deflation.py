"""Tests for LN deflation (coupling/deflation.py)."""
import pytest
import torch
import torch.nn.functional as F

from coupling.deflation import DeflatedOperator, deflate, deflation_basis, norm_null_directions
from coupling.linop import DenseOperator


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_deflation_basis_orthonormal_and_drops_degenerate():
    d = 7
    a = torch.randn(d, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(d, generator=_gen(1), dtype=torch.float64)
    vecs = [a, torch.zeros(d, dtype=torch.float64), 2 * a, b, a - 3 * b, torch.ones(d, dtype=torch.float64)]
    Q = deflation_basis(vecs, include_ones=True)
    assert Q.shape == (d, 3) and Q.dtype == torch.float64       # span{1, a, b}
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Q[:, 0], torch.full((d,), d ** -0.5, dtype=torch.float64))
    for v in (a, b, torch.ones(d, dtype=torch.float64)):       # each vector lies in span(Q)
        torch.testing.assert_close(Q @ (Q.T @ v), v)
    assert deflation_basis([], include_ones=False, d=5).shape == (5, 0)
    with pytest.raises(ValueError, match="pass d"):
        deflation_basis([], include_ones=True)
    with pytest.raises(ValueError, match="disagree"):
        deflation_basis([a, torch.ones(3)], include_ones=False)


def test_deflate_kills_ones_on_both_sides_operator_equals_dense():
    d_out, d_in = 6, 5
    J = torch.randn(d_out, d_in, generator=_gen(2), dtype=torch.float64)
    x = torch.randn(d_in, generator=_gen(3), dtype=torch.float64)
    Jd = deflate(DenseOperator(J), in_vectors=[x], include_ones=True)
    assert Jd.shape == (d_out, d_in)
    assert (Jd @ torch.ones(d_in, dtype=torch.float64)).abs().max() < 1e-12
    assert (Jd @ x).abs().max() < 1e-12
    assert (Jd.T @ torch.ones(d_out, dtype=torch.float64)).abs().max() < 1e-12
    # operator path against the dense projections
    Qi = deflation_basis([x], include_ones=True)
    Qo = deflation_basis([], include_ones=True, d=d_out, dtype=torch.float64)
    dense = (torch.eye(d_out, dtype=torch.float64) - Qo @ Qo.T) @ J @ (
        torch.eye(d_in, dtype=torch.float64) - Qi @ Qi.T)
    torch.testing.assert_close(Jd.to_dense(), dense)
    M = torch.randn(d_out, 3, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(Jd.rmatmat(M), dense.T @ M)


def test_deflate_one_side_only():
    J = torch.randn(5, 5, generator=_gen(5))
    ones = torch.ones(5)
    Jd = deflate(J, include_ones="in")
    assert (Jd @ ones).abs().max() < 1e-5
    assert (Jd.T @ ones).abs().max() > 1e-2        # output side untouched
    assert Jd.dtype == torch.float32
    Jn = deflate(J, include_ones=False)
    torch.testing.assert_close(Jn.to_dense(), J)
    with pytest.raises(ValueError, match="include_ones"):
        deflate(J, include_ones="both")


def test_deflated_operator_rejects_non_orthonormal_basis():
    J = torch.randn(4, 4, generator=_gen(6))
    with pytest.raises(ValueError, match="orthonormal"):
        DeflatedOperator(J, Q_in=torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"\(4, r\)"):
        DeflatedOperator(J, Q_in=torch.ones(3, 1))


def test_norm_null_directions_are_null_vectors_of_the_norm_jacobian():
    d = 8
    x = torch.randn(d, generator=_gen(7), dtype=torch.float64) + 0.5
    g = torch.rand(d, generator=_gen(8), dtype=torch.float64) + 0.5
    ln = lambda z: F.layer_norm(z, (d,), weight=g, eps=0.0)
    J_ln = torch.func.jacrev(ln)(x)
    for v in norm_null_directions(x, "layernorm"):
        assert (J_ln @ v).abs().max() < 1e-10
    for w in norm_null_directions(x, "layernorm", weight=g, side="out"):
        assert (J_ln.T @ w).abs().max() < 1e-10
    rms = lambda z: g * z / z.pow(2).mean().sqrt()
    J_rms = torch.func.jacrev(rms)(x)
    (v,) = norm_null_directions(x, "rmsnorm")
    assert (J_rms @ v).abs().max() < 1e-10
    # deflating a pre-LN-like composite W J_ln by the norm's null vectors changes nothing
    W = torch.randn(d, d, generator=_gen(9), dtype=torch.float64)
    Jd = deflate(W @ J_ln, in_vectors=norm_null_directions(x, "layernorm"), include_ones=False)
    torch.testing.assert_close(Jd.to_dense(), W @ J_ln)
