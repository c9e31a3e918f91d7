"""Perturbation of a token's input embedding (Fig. 34): known answers at the embedding layer."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special

from coupling.cli import add_perturb_parser
from coupling.experiments.perturb import perturb
from coupling.model.loading import TINY_MODEL_DIR, LoadedModel, load_model
from coupling.model.zoo import build_random, small_config


@pytest.fixture(scope="module")
def llama():
    """A random Llama: ``X^0`` is ``inputs_embeds`` itself (no positional embedding added)."""
    config = small_config("llama", n_layers=2, d=32, heads=4, vocab=128)
    model = build_random(config, seed=0)
    return LoadedModel(model, None, config, {"id": "random-llama", "n_layers": 2, "d_model": 32})


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    from coupling.model.zoo import save_random

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    folder = tmp_path_factory.mktemp("gpt2")
    return save_random(small_config("gpt2", n_layers=3, d=32, vocab=len(tok), max_pos=64),
                       folder, tokenizer=tok)


IDS = torch.tensor([[5, 17, 99, 3, 42, 7]])


def expected_cosine(sigma: float, d: int, nodes: int = 80) -> float:
    """E cos(x, x + eps), eps ~ N(0, sigma^2 ||x||^2 / d I_d), exactly (Gauss quadrature).

    Split eps along x (c*u*||x||, u ~ N(0,1), c = sigma/sqrt(d)) and across it
    (||eps_perp||^2 = c^2 ||x||^2 w, w = 2g ~ chi2(d-1), g ~ Gamma((d-1)/2)):
    cos = (1 + c u) / sqrt((1 + c u)^2 + c^2 w).  Gauss-Hermite nodes integrate over u,
    generalized Gauss-Laguerre nodes over g (agrees with scipy's dblquad to 1e-13).
    """
    c = sigma / np.sqrt(d)
    u, wu = special.roots_hermitenorm(nodes)
    g, wg = special.roots_genlaguerre(nodes, (d - 1) / 2 - 1)
    a = 1 + c * u[:, None]
    return float(wu @ (a / np.sqrt(a * a + c * c * 2 * g[None, :])) @ wg / (wu.sum() * wg.sum()))


def test_zero_noise_leaves_every_layer_unchanged(llama):
    res = perturb(llama, IDS, noise_levels=(0.0,), n_samples=3)
    assert res.cosine.shape == (1, 3, 3)            # levels x samples x (L+1)
    np.testing.assert_allclose(res.cosine, 1.0, atol=1e-6)
    np.testing.assert_allclose(res.rel_change, 0.0, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_embedding_layer_cosine_has_the_known_mean(llama, sigma):
    n = 400
    res = perturb(llama, IDS, noise_levels=(sigma,), n_samples=n, seed=1)
    c0 = res.cosine[0, :, 0]
    want = expected_cosine(sigma, 32)
    assert want == pytest.approx(1 / np.sqrt(1 + sigma ** 2), abs=0.01)  # the large-d limit
    assert abs(c0.mean() - want) < 4 * c0.std(ddof=1) / np.sqrt(n), (c0.mean(), want)


def test_embedding_layer_cosine_falls_monotonically_with_noise(llama):
    levels = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    res = perturb(llama, IDS, noise_levels=levels, n_samples=16, token=2)
    c0 = res.cosine[:, :, 0]                          # (levels, samples)
    assert (np.diff(c0, axis=0) < 0).all()            # same draws z at every level
    t = res.table
    means = t[t.layer == 0].cos_mean.to_numpy()
    assert (np.diff(means) < 0).all() and means[0] > 0.999
    # rel. change at layer 0 is ||eps|| / ||x||: mean of sigma * chi_d / sqrt(d) ~ sigma
    np.testing.assert_allclose(t[t.layer == 0].rel_change_mean, levels, rtol=0.25)


def test_table_layout(llama):
    res = perturb(llama, IDS, noise_levels=(0.1, 1.0), n_samples=4)
    t = res.table
    assert list(t.columns) == ["level", "layer", "cos_mean", "cos_std", "rel_change_mean",
                               "n_samples"]
    assert len(t) == 2 * 3 and set(t.layer) == {0, 1, 2}
    row = t[(t.level == 1.0) & (t.layer == 2)].iloc[0]
    assert row.cos_mean == pytest.approx(res.cosine[1, :, 2].mean())
    assert row.cos_std == pytest.approx(res.cosine[1, :, 2].std(ddof=1))
    assert (t.cos_mean <= 1 + 1e-9).all() and (t.cos_mean >= -1).all()


def test_gpt2_with_text_prompt_and_positional_embeddings(gpt2_folder):
    lm = load_model(gpt2_folder)
    res = perturb(lm, "The capital of France is", noise_levels=(0.0, 0.1, 1.0), n_samples=4)
    np.testing.assert_allclose(res.cosine[0], 1.0, atol=1e-6)
    assert res.token == res.n_tokens - 1
    # X^0 = wte + wpe: noise of norm ~sigma*||wte|| tilts X^0 less than it would tilt wte
    x = lm.model.get_input_embeddings().weight[lm.tokenizer("The capital of France is")
                                               ["input_ids"][-1]]
    assert res.embedding_norm == pytest.approx(float(x.norm()), rel=1e-6)
    c0 = res.cosine[:, :, 0].mean(axis=1)
    assert c0[0] > c0[1] > c0[2]


def test_bad_arguments(llama):
    with pytest.raises(ValueError, match="out of range"):
        perturb(llama, IDS, token=6)
    with pytest.raises(ValueError, match="noise levels"):
        perturb(llama, IDS, noise_levels=(-0.1,))
    with pytest.raises(ValueError, match="noise levels"):
        perturb(llama, IDS, noise_levels=())
    with pytest.raises(ValueError, match="n_samples"):
        perturb(llama, IDS, n_samples=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        perturb(llama, "some text")


def test_command_line_writes_table_and_figure(gpt2_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_perturb_parser(parser.add_subparsers())
    args = parser.parse_args(["perturb", "--model", gpt2_folder, "--levels", "0.1,1",
                              "--samples", "3", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    t = pd.read_csv(tmp_path / "p" / "perturbation.csv")
    assert len(t) == 2 * 4 and set(t.level) == {0.1, 1.0}
    assert (tmp_path / "p" / "perturbation.png").stat().st_size > 10_000
    assert "cos at layer 0" in capsys.readouterr().out
