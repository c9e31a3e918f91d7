"""Known-answer tests for trajectory regularity (coupling/measures/regularity.py)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from coupling.measures.regularity import (LinearLens, equidistance_cv, expodistance,
                                          layer_norms, line_shape_score, log_growth_rates,
                                          logit_lens_entropy, pca_projection, step_sizes,
                                          windowed_lss)

RNG = np.random.default_rng(0)


def _line(L, d, positions, seed=0):
    rng = np.random.default_rng(seed)
    x0, u = rng.normal(size=d), rng.normal(size=d)
    return x0 + np.asarray(positions, dtype=float)[:, None] * u


def test_straight_line_has_lss_one_for_any_spacing():
    traj = _line(6, 5, [0.0, 0.1, 0.5, 2.0, 2.2, 9.0, 30.0])
    assert line_shape_score(traj) == pytest.approx(1.0, abs=1e-12)
    batch = np.stack([traj, _line(6, 5, np.arange(7) ** 2, seed=1)], axis=1)  # (L+1, n, d)
    np.testing.assert_allclose(line_shape_score(torch.from_numpy(batch)), [1.0, 1.0], atol=1e-12)


def test_zigzag_lss_is_sqrt2():
    # steps alternate between e1 and e2 (any lengths): x~^L - x~^0 = m e1 + m e2, L = 2m
    d, m = 4, 5
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    steps = [(1 + l) * (e1 if l % 2 == 0 else e2) for l in range(2 * m)]
    traj = np.cumsum([np.zeros(d)] + steps, axis=0)
    assert line_shape_score(traj) == pytest.approx(math.sqrt(2.0))


def test_zero_step_raises():
    traj = _line(3, 4, [0.0, 1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="zero step"):
        line_shape_score(traj)
    with pytest.raises(ValueError, match="zero step"):
        windowed_lss(traj, 3)


def test_windowed_lss_edges_and_centre():
    traj = np.cumsum(RNG.normal(size=(9, 2, 6)), axis=0)  # L = 8, two tokens
    w = windowed_lss(traj, width=5)
    assert w.shape == (9, 2)
    assert np.isnan(w[:2]).all() and np.isnan(w[-2:]).all()
    np.testing.assert_allclose(w[4], line_shape_score(traj[2:7]))
    t = windowed_lss(traj, width=5, edge="truncate")
    np.testing.assert_allclose(t[0], line_shape_score(traj[0:3]))
    np.testing.assert_allclose(t[2:7], w[2:7])
    straight = windowed_lss(_line(8, 3, np.arange(9.0) ** 1.5), width=3, edge="truncate")
    np.testing.assert_allclose(straight, 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="odd"):
        windowed_lss(traj, width=4)
    with pytest.raises(ValueError, match="exceeds"):
        windowed_lss(traj, width=11)


def test_expodistance_zero_for_exponential_norms_and_hand_value():
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(7, 5))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)          # direction may change freely
    traj = dirs * (1.3 ** np.arange(7))[:, None]
    assert expodistance(traj) == pytest.approx(0.0, abs=1e-20)
    # norms 1, e, e^3 -> alpha = (1, 2): Var = 0.25, Mean^2 = 2.25 -> ED = 1/9
    hand = np.array([[1.0, 0.0], [0.0, math.e], [math.e ** 3, 0.0]])
    assert expodistance(hand) == pytest.approx(1.0 / 9.0)
    np.testing.assert_allclose(log_growth_rates(hand), [1.0, 2.0])
    with pytest.raises(ValueError, match="zero vector"):
        expodistance(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_equidistance_cv():
    traj = np.cumsum(np.vstack([np.zeros((1, 3)), 2.0 * np.eye(3)[[0, 1, 2, 0]]]), axis=0)
    assert equidistance_cv(traj) == pytest.approx(0.0, abs=1e-15)   # four steps of length 2
    hand = np.array([[0.0], [1.0], [4.0]])                            # steps 1, 3: std 1 / mean 2
    assert equidistance_cv(hand) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="never moves"):
        equidistance_cv(np.ones((3, 2)))


def test_norms_and_steps_shapes_and_values():
    X = np.zeros((3, 2, 2))
    X[:, 0, 0] = [3.0, 4.0, 6.0]
    X[:, 1, 1] = [1.0, 1.0, 2.0]
    np.testing.assert_allclose(layer_norms(X), [[3, 1], [4, 1], [6, 2]])
    np.testing.assert_allclose(step_sizes(X), [[1, 0], [2, 1]])
    assert layer_norms(X[:, 0]).shape == (3,)
    with pytest.raises(ValueError, match="trajectory"):
        layer_norms(np.zeros(5))


def test_logit_lens_entropy_uniform_peaked_and_scipy_reference():
    V, n, L = 50, 3, 2
    X = torch.randn(L + 1, n, 4, generator=torch.Generator().manual_seed(0))
    H = logit_lens_entropy(X, lambda h: torch.zeros(h.shape[0], V))
    np.testing.assert_allclose(H, np.log(V), rtol=1e-12)
    assert H.shape == (L + 1, n)
    W = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    H = logit_lens_entropy(X, lambda h: h @ W)
    ref = scipy.stats.entropy(torch.softmax((X @ W).double(), -1).numpy(), axis=-1)
    np.testing.assert_allclose(H, ref, rtol=1e-6)
    # masked vocabulary (-inf logits) and a different head for the last layer
    peaked = lambda h: torch.tensor([[0.0] + [-math.inf] * (V - 1)]).expand(h.shape[0], V)
    H = logit_lens_entropy(X, lambda h: torch.zeros(h.shape[0], V), last_head=peaked)
    np.testing.assert_allclose(H[-1], 0.0, atol=1e-12)
    np.testing.assert_allclose(H[0], np.log(V))
    assert logit_lens_entropy(X[:, 0], lambda h: torch.zeros(h.shape[0], V)).shape == (L + 1,)
    with pytest.raises(ValueError, match=r"\(n, V\)"):
        logit_lens_entropy(X, lambda h: torch.zeros(V))


def test_streamed_linear_lens_equals_the_float64_entropy_at_every_chunking():
    """A LinearLens is streamed (rows x vocabulary chunks, running log-sum-exp): the entropies
    are those of the whole float64 softmax, whatever the chunks, across layer boundaries,
    with masked words (-inf bias; a whole masked chunk first) and the last layer unnormed."""
    L, n, d, V = 3, 5, 16, 61
    g = torch.Generator().manual_seed(3)
    X = torch.randn(L + 1, n, d, generator=g) * 2
    W = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g)
    b[:8] = -math.inf                     # the first vocabulary chunk of 8 is all masked
    b[20] = -math.inf
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    lens = LinearLens(W, b, norm)
    last = LinearLens(W, b)

    def reference(l):                     # float64 throughout
        h = X[l].double()
        if l < L:
            h = torch.nn.functional.layer_norm(h, (d,), norm.weight.double().detach(),
                                               norm.bias.double().detach(), norm.eps)
        z = h @ W.double().T + b.double()
        p = torch.softmax(z, -1)
        return -(torch.where(p > 0, p * torch.log_softmax(z, -1), 0.0)).sum(-1), h, z

    ref = [reference(l) for l in range(L + 1)]
    want = torch.stack([r[0] for r in ref]).numpy()
    # float32 logits: each is off by at most d u ||h|| ||w|| (a float32 dot product), and
    # |dH| <= max|dz| (max z - min z) over the words that are not masked
    h_norm = max(float(r[1].norm(dim=-1).max()) for r in ref)
    dz = d * 2.0 ** -24 * h_norm * float(W.norm(dim=-1).max()) + 2.0 ** -24 * float(b[b > -1e9].abs().max())
    live = torch.cat([r[2][:, b > -math.inf] for r in ref])
    tol = dz * float(live.max() - live.min())
    for rows, vocab in ((1, 1), (3, 8), (7, 13), (n, V), (100, 1000)):
        H = logit_lens_entropy(X, lens, last, rows=rows, vocab=vocab)
        assert H.shape == (L + 1, n)
        np.testing.assert_allclose(H, want, rtol=0, atol=tol)
    # the same entropies as the same heads taken one layer at a time as plain callables
    H = logit_lens_entropy(X, lambda h: lens(h), lambda h: last(h))
    np.testing.assert_allclose(H, want, rtol=0, atol=tol)
    # a zero unembedding: exactly uniform over the V words
    H = logit_lens_entropy(X, LinearLens(torch.zeros(V, d)), rows=3, vocab=7)
    np.testing.assert_allclose(H, np.log(V), rtol=1e-13)


def test_pca_recovers_a_plane():
    rng = np.random.default_rng(2)
    d, n, L = 10, 6, 4
    basis, _ = np.linalg.qr(rng.normal(size=(d, 2)))               # plane spanned by 2 columns
    centre = rng.normal(size=d)
    coords = rng.normal(size=(L + 1, n, 2))
    X = centre + coords @ basis.T                                    # every state in the plane
    res = pca_projection(X)
    assert res.projections.shape == (L + 1, n, 2)
    np.testing.assert_allclose(res.explained_variance_ratio.sum(), 1.0)
    # the components span the plane and reconstruct every state of every layer
    np.testing.assert_allclose(res.components @ res.components.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(basis @ (basis.T @ res.components.T), res.components.T, atol=1e-12)
    np.testing.assert_allclose(res.mean + res.projections @ res.components, X, atol=1e-12)
    # fit on the last layer: those projections are centred
    np.testing.assert_allclose(res.projections[-1].mean(axis=0), 0.0, atol=1e-12)
    # a layer range, fit on its own last layer
    sub = pca_projection(X, layers=slice(0, 3))
    assert sub.projections.shape == (3, n, 2)
    np.testing.assert_allclose(sub.mean, X[2].mean(axis=0))
    with pytest.raises(ValueError, match="fit_on='all'"):
        pca_projection(X[:, 0])
    assert pca_projection(X[:, 0], fit_on="all").projections.shape == (L + 1, 2)
