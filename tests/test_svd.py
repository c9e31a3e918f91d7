"""Top-K SVD methods against matrices with known singular vectors and real block operators."""
import pytest
import torch

from coupling.blocks import residual_branch
from coupling.jacobian import BlockJacobian, exact_jacobian
from coupling.loading import LoadedModel
from coupling.svd import randomized_svd, top_k_svd
from coupling.trajectory import run_forward
from coupling.zoo import build_random, random_inputs, small_config


def known_matrix(d, spectrum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (U * spectrum) @ V.T, U, V


def max_sine(A, B):
    """Largest sine of the principal angles between the column spans of A and B."""
    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    # ||(I - Qb Qb^T) Qa||_2 is accurate for tiny angles, unlike sqrt(1 - cos^2)
    return float(torch.linalg.matrix_norm(Qa - Qb @ (Qb.T @ Qa), ord=2))


@pytest.mark.parametrize("method,tol_angle,tol_val", [
    ("exact", 1e-10, 1e-12), ("lanczos", 1e-8, 1e-10), ("randomized", 1e-6, 1e-10)])
def test_methods_recover_known_vectors_on_decaying_spectrum(method, tol_angle, tol_val):
    d, k = 120, 8
    s = 0.7 ** torch.arange(d, dtype=torch.float64)   # gap s_k/s_{k+1} = 1/0.7
    J, U, V = known_matrix(d, s)
    res = top_k_svd(J, k, method=method, n_iter=6, oversample=10)
    assert torch.allclose(res.S, s[:k], rtol=tol_val, atol=0)
    assert max_sine(res.U, U[:, :k]) < tol_angle
    assert max_sine(res.V, V[:, :k]) < tol_angle
    # each triplet is consistent: J v_i = s_i u_i
    torch.testing.assert_close(J @ res.V, res.U * res.S, atol=1e-8, rtol=1e-8)


def test_randomized_degrades_on_flat_spectrum_more_power_iterations_help():
    """Nearly flat spectra (as in transformer blocks) are subspace iteration's worst case."""
    d, k = 200, 10
    s = torch.linspace(2.0, 1.0, d, dtype=torch.float64)
    J, U, _ = known_matrix(d, s, seed=3)
    errs = [max_sine(randomized_svd(J, k, n_iter=q, seed=0).U, U[:, :k]) for q in (0, 4, 32)]
    assert errs[0] > 0.5 and errs[2] < errs[0]
    exact = top_k_svd(J, k, "lanczos")
    assert max_sine(exact.U, U[:, :k]) < 1e-6   # lanczos (tol=0) is exact regardless


def test_randomized_is_seeded():
    J, _, _ = known_matrix(50, torch.linspace(3, 1, 50, dtype=torch.float64))
    a, b = randomized_svd(J, 5, seed=7), randomized_svd(J, 5, seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


def test_k_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="K=40 must be between 1 and the Jacobian size d=30"):
        top_k_svd(torch.eye(30), 40)
    with pytest.raises(ValueError, match="unknown SVD method"):
        top_k_svd(torch.eye(3), 1, method="qr")


@pytest.fixture(scope="module")
def block_operator():
    cfg = small_config("gpt2", d=64)
    lm = LoadedModel(build_random(cfg), None, cfg, {"n_layers": 2})
    rec = run_forward(lm, random_inputs("gpt2", n_tokens=8))
    call = rec.calls[1]
    f = residual_branch(call)
    return BlockJacobian(f, call.input, 7, 7), exact_jacobian(f, call.input, 7, 7)


def test_methods_agree_on_a_real_block_operator(block_operator):
    op, dense = block_operator
    k = 6
    ref = top_k_svd(dense.double(), k, "exact")
    lan = top_k_svd(op, k, "lanczos")
    assert torch.allclose(lan.S.double(), ref.S, rtol=1e-5)
    assert max_sine(lan.V.double(), ref.V) < 1e-3
    ex = top_k_svd(op, k, "exact")          # dense from d JVPs
    assert torch.allclose(ex.S.double(), ref.S, rtol=1e-5)
    rnd = top_k_svd(op, k, "randomized", n_iter=8)
    assert torch.allclose(rnd.S.double(), ref.S, rtol=0.1)   # values are forgiving


def test_matrix_free_path_never_allocates_d_by_d_at_huge_d():
    """d = 100,000: a dense float32 d x d would take 40 GB, beyond this 24 GB machine."""
    d = 100_000
    budget = 24 << 30
    assert d * d * 4 > budget
    # singular values |w - 1| of the elementwise block: 4, 3, 2, 1.5 then <= 0.5
    w = torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.5]), torch.linspace(1.5, 0.5, d - 4)])

    def f(X):                                   # an elementwise "block", d = 60,000
        return torch.tanh(X * w) - X
    X = torch.zeros(1, 2, d)
    op = BlockJacobian(f, X, 1, 1, chunk=8)
    res = top_k_svd(op, 4, "lanczos")
    torch.testing.assert_close(res.S, torch.tensor([4.0, 3.0, 2.0, 1.5]), rtol=1e-4, atol=1e-4)
    res2 = top_k_svd(op, 4, "randomized", n_iter=4)
    torch.testing.assert_close(res2.S, torch.tensor([4.0, 3.0, 2.0, 1.5]), rtol=1e-2, atol=1e-2)


def test_dense_top_k_picks_arpack_or_full_svd_and_both_are_exact():
    """``svd: auto`` on a dense J: ARPACK for K < d/16 (d > 512), else the full SVD; either
    way the known top-K triplets come back."""
    from coupling.svd import dense_top_k, full_svd_pays
    assert full_svd_pays(256, 10) and full_svd_pays(768, 50) and full_svd_pays(4096, 10, "cuda")
    assert not full_svd_pays(768, 10) and not full_svd_pays(2048, 50)
    d = 600
    spectrum = torch.cat([torch.linspace(3, 2, 40), torch.linspace(1, 0.1, d - 40)]).double()
    J, U, V = known_matrix(d, spectrum, seed=3)
    for k in (10, 40):                                   # 10 < 600/16 -> ARPACK; 40 -> full
        res = dense_top_k(J.float(), k)
        assert torch.allclose(res.S.double(), spectrum[:k], rtol=1e-5)
        assert max_sine(res.V, V[:, :k]) < 1e-3 and max_sine(res.U, U[:, :k]) < 1e-3
        # singular triplets: J v = s u
        assert torch.allclose(J.float() @ res.V, res.U * res.S, atol=1e-4)
