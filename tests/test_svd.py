"""Top-K SVD methods against matrices with known singular vectors and real block operators."""
import pytest
import torch

from gap_tolerance import assert_close_by_gap, depth_tolerance_from_spectra
from coupling.jacobian.block_jacobian import BlockJacobian, exact_jacobian
from coupling.model.blocks import residual_branch
from coupling.model.loading import LoadedModel
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, small_config
from coupling.spectrum.svd import randomized_svd, top_k_svd


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
    # K = 3: s_{K+1} = 1.5 is computed too; K = 4 would put s_{K+1} in the 100,000-fold
    # cluster at 0.5, which ARPACK resolves to tol=0 only after thousands of restarts
    res = top_k_svd(op, 3, "lanczos")
    torch.testing.assert_close(res.S, torch.tensor([4.0, 3.0, 2.0]), rtol=1e-4, atol=1e-4)
    assert float(res.s_next) == pytest.approx(1.5, rel=1e-4) and res.fallback is None
    res2 = top_k_svd(op, 4, "randomized", n_iter=4)
    torch.testing.assert_close(res2.S, torch.tensor([4.0, 3.0, 2.0, 1.5]), rtol=1e-2, atol=1e-2)


def test_dense_top_k_picks_arpack_or_full_svd_and_both_are_exact():
    """``svd: auto`` on a dense J: ARPACK for K < d/4 (d > 512), else the full SVD; either
    way the known top-K triplets come back."""
    from coupling.spectrum.svd import dense_top_k, full_svd_pays
    assert full_svd_pays(256, 10) and full_svd_pays(768, 192) and full_svd_pays(4096, 10, "cuda")
    assert not full_svd_pays(768, 50) and not full_svd_pays(2048, 50)
    d = 600
    spectrum = torch.cat([torch.linspace(3, 2, 40), torch.linspace(1.9, 1.2, 110),
                          torch.linspace(1, 0.1, d - 150)]).double()
    J, U, V = known_matrix(d, spectrum, seed=3)
    for k in (10, 150):                                  # 10 < 600/4 -> ARPACK; 150 -> full
        res = dense_top_k(J.float(), k)
        assert torch.allclose(res.S.double(), spectrum[:k], rtol=1e-5)
        assert max_sine(res.V, V[:, :k]) < 1e-3 and max_sine(res.U, U[:, :k]) < 1e-3
        # singular triplets: J v = s u
        assert torch.allclose(J.float() @ res.V, res.U * res.S, atol=1e-4)


@pytest.mark.parametrize("method", ["exact", "lanczos", "randomized"])
def test_every_method_returns_the_next_singular_value(method):
    """``s_{K+1}`` (for the s_K/s_{K+1} gap) from every route, against the known spectrum."""
    d, k = 120, 8
    s = 0.7 ** torch.arange(d, dtype=torch.float64)
    J, _, _ = known_matrix(d, s)
    res = top_k_svd(J, k, method=method, n_iter=6)
    torch.testing.assert_close(res.s_next, s[k], rtol=1e-8, atol=0)
    assert res.gap == pytest.approx(1 / 0.7) and res.fallback is None
    cut = res.truncate(3)
    assert float(cut.s_next) == float(res.S[3]) and cut.k == 3
    assert top_k_svd(J[:5, :5], 5, "exact").s_next is None      # K = d: nothing left out


def test_dense_top_k_routes_return_the_next_singular_value():
    from coupling.spectrum.svd import dense_top_k
    d = 600
    spectrum = torch.cat([torch.linspace(3, 2, 40), torch.linspace(1.9, 1.2, 110),
                          torch.linspace(1, 0.1, d - 150)]).double()
    J, _, _ = known_matrix(d, spectrum, seed=5)
    for k in (10, 150):                                  # ARPACK on the dense J; full SVD
        res = dense_top_k(J.float(), k)
        assert float(res.s_next) == pytest.approx(float(spectrum[k]), rel=1e-5)


def test_arpack_non_convergence_falls_back_to_the_dense_svd_and_says_so():
    """ARPACK capped at one restart on a nearly flat spectrum does not converge: the result
    comes from the dense SVD (an operator is materialised by products), exact, recorded."""
    from coupling.spectrum.svd import DENSE_FALLBACK_MAX_D
    d, k = 300, 10
    s = torch.linspace(2.0, 1.0, d, dtype=torch.float64)
    J, U, V = known_matrix(d, s, seed=4)
    normal = top_k_svd(J, k, "lanczos")
    assert normal.fallback is None
    linear = BlockJacobian(lambda X: X @ J.T, torch.zeros(1, 1, d, dtype=torch.float64), 0, 0)
    for A in (J, linear):                  # a dense matrix; an operator (JVP/VJP products)
        res = top_k_svd(A, k, "lanczos", maxiter=1)
        assert res.fallback is not None and "ARPACK not converged in 1 restarts" in res.fallback
        assert torch.allclose(res.S, s[:k], rtol=1e-12) and float(res.s_next) == pytest.approx(float(s[k]))
        assert max_sine(res.U, U[:, :k]) < 1e-8
    # past DENSE_FALLBACK_MAX_D the dense matrix is not built: a one-line error instead
    d = DENSE_FALLBACK_MAX_D + 8
    w = torch.cat([torch.tensor([5.0, 4.0, 3.0]), torch.linspace(1.5, 0.5, d - 3)])
    op = BlockJacobian(lambda X: torch.tanh(X * w) - X, torch.zeros(1, 1, d), 0, 0, chunk=8)
    with pytest.raises(RuntimeError, match="ARPACK did not converge in 1 restarts and a dense "
                                           f"{d}x{d} Jacobian is too large"):
        top_k_svd(op, 3, "lanczos", maxiter=1)     # s_4 sits in a 32,000-fold cluster


def test_scan_records_the_fallback_per_layer(tmp_path):
    """``arpack_maxiter: 1`` in a scan: every layer falls back, the grids are still the exact
    ones, and layers.parquet / the summary say which layers fell back."""

    from coupling.analysis.prompt import analyze_prompt
    from coupling.results.scan_output import layers_frame, summary_frame
    from coupling.settings.scan_settings import ScanSettings
    cfg = small_config("gpt2", d=64, n_layers=3)
    lm = LoadedModel(build_random(cfg), None, cfg, {"n_layers": 3})
    ids = random_inputs("gpt2", n_tokens=6)["input_ids"]
    rec = run_forward(lm, ids)
    common = dict(k=4, svd="lanczos", measures=("depth", "regularity"))
    capped = analyze_prompt(lm, ids, ScanSettings(arpack_maxiter=1, **common), record=rec)
    free = analyze_prompt(lm, ids, ScanSettings(**common), record=rec)
    assert capped.spectral_flags["svd_fallback"].all() and not free.spectral_flags["svd_fallback"].any()
    assert capped.summary["depth_svd_fallbacks"] == 3 and free.summary["depth_svd_fallbacks"] == 0
    tol = depth_tolerance_from_spectra(free.depth_normalized, free.depth_raw,
                                       free.singular_values, free.next_singular_values, 64)
    assert_close_by_gap(capped.depth_normalized, free.depth_normalized, tol.normalized,
                        tol.determined, "depth m~")
    layers = layers_frame([capped])
    assert list(layers["svd_fallback"].iloc[1:]) == [True] * 3 and layers["svd_fallback"].isna()[0]
    assert summary_frame([capped])["depth_svd_fallbacks"].iloc[0] == 3
    with pytest.raises(ValueError, match="arpack_maxiter must be a positive integer"):
        ScanSettings(arpack_maxiter=0)
