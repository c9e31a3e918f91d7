"""Token-wise grids from only the Jacobians they read, against the all-pairs computation.

``all_pairs_tokens`` below is the implementation the scan used before (every ``J_{t1 t2}`` of
both layers from one VJP sweep per output token, the SVD of every pair of layer l'), kept
here verbatim as the reference: the scan now computes only ``J_tt``, ``J_{0 t}`` and
``J_{t, n-1}`` and must give the same grids to float32 round-off.
"""
import numpy as np
import pytest
import torch

from gap_tolerance import assert_close_by_gap, token_tolerance
from coupling.analysis.prompt import analyze_prompt
from coupling.analysis.steps import _token_jacobians, fast_block, layer_function
from coupling.jacobian.block_jacobian import exact_jacobians, exact_jacobians_from_input
from coupling.measures.coupling_grids import (context_coupling_fixed_input,
                                              context_coupling_fixed_output, token_grid_pairs,
                                              token_self_coupling)
from coupling.model.hf_call import is_causal
from coupling.model.loading import LoadedModel
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, small_config
from coupling.settings.scan_settings import ScanSettings
from coupling.spectrum.svd import svd_of_dense


def all_pairs_tokens(lm, record, settings):
    """The pre-cut token-wise analysis (coupling/analysis/prompt.py ``_tokens`` at commit 0bb4342)."""
    n = record.n_tokens
    l, lp = settings.token_layers                     # given by every caller here
    k = min(settings.k, record.hidden_states.shape[-1])
    causal = is_causal(record.calls[l - 1])
    J = {layer: {} for layer in (l, lp)}
    for layer in {l, lp}:
        chunk = settings.products_per_batch(one_token=False)
        if settings.jacobian == "local":
            fb = fast_block(record, layer, settings, lm.model)
            jacobians_at = lambda t2, fb=fb: fb.jacobians(t2, chunk=chunk)  # noqa: E731
        else:
            f = layer_function(record, layer, settings, lm.model)
            X = record.calls[layer - 1].input.float()
            jacobians_at = lambda t2, f=f, X=X: exact_jacobians(f, X, t2, None, chunk)  # noqa: E731
        for t2 in range(n):
            all_t1 = jacobians_at(t2)
            for t1 in range(n):
                if not causal or t1 <= t2:
                    J[layer][(t1, t2)] = all_t1[t1]
    S = {key: svd_of_dense(M, k).as_tuple() for key, M in J[lp].items()}
    return {"self": token_self_coupling([J[l][(t, t)] for t in range(n)],
                                        [S[(t, t)] for t in range(n)], k)["normalized"],
            "fixed_input": context_coupling_fixed_input(J[l], S, 0, k, n=n,
                                                        causal=causal)["normalized"],
            "fixed_output": context_coupling_fixed_output(J[l], S, n - 1, k, n=n,
                                                          causal=causal)["normalized"]}


def _model(family, n_tokens=12, n_layers=3):
    cfg = small_config(family, n_layers=n_layers, d=32)
    if family == "bert":
        # at BERT's own init (0.02) every block's top two singular values are the norm's
        # exact 1s: every token-wise entry would be undetermined (tests/gap_tolerance.py)
        cfg.initializer_range = 0.2
    lm = LoadedModel(build_random(cfg, seed=2), None, cfg, {"n_layers": n_layers})
    ids = random_inputs(family, n_tokens=n_tokens)["input_ids"]
    return lm, ids, run_forward(lm, ids)


@pytest.mark.parametrize("family,jacobian,layers", [
    ("gpt2", "local", (1, 2)), ("gpt2", "full", (2, 3)), ("gpt2", "local", (2, 2)),
    ("llama", "local", (1, 3)), ("bert", "local", (1, 2)), ("bert", "full", (2, 2))])
def test_grids_equal_the_all_pairs_reference(family, jacobian, layers):
    lm, ids, rec = _model(family)
    settings = ScanSettings(k=4, jacobian=jacobian, measures=("tokens",), token_layers=layers)
    got = analyze_prompt(lm, ids, settings, record=rec).tokens
    ref = all_pairs_tokens(lm, rec, settings)
    tol = token_tolerance(lm, rec, settings)      # from the gaps of each pair's spectrum
    for name in ("self", "fixed_input", "fixed_output"):
        assert_close_by_gap(got[name], ref[name], tol[name].normalized, tol[name].determined,
                            f"{family} {name}")
    # causal prompts: only the pairs t1 <= t2 are defined in the fixed-input grid
    assert np.isfinite(got["self"]).all() and np.isfinite(got["fixed_output"]).all()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_only_the_pairs_the_grids_read_are_computed(family):
    """Every Jacobian computed equals the whole-prompt one, and nothing else is computed."""
    lm, ids, rec = _model(family, n_tokens=7)
    n, layer = rec.n_tokens, 2
    settings = ScanSettings(k=4, measures=("tokens",))
    causal = is_causal(rec.calls[layer - 1])
    pairs = token_grid_pairs(n, 0, n - 1, causal)
    assert len(pairs) == 3 * n - 3
    got = _token_jacobians(rec, layer, settings, lm.model, pairs)
    assert set(got) == pairs
    f = layer_function(rec, layer, settings, lm.model)
    X = rec.calls[layer - 1].input.float()
    for t2 in range(n):
        full = exact_jacobians(f, X, t2)
        for t1 in range(n):
            if (t1, t2) in pairs:
                torch.testing.assert_close(got[(t1, t2)], full[t1], atol=1e-5, rtol=1e-4)


def test_jvp_sweep_from_one_input_equals_vjp_sweeps():
    lm, ids, rec = _model("llama", n_tokens=6)
    f = layer_function(rec, 2, ScanSettings(), lm.model)
    X = rec.calls[1].input.float()
    cols = exact_jacobians_from_input(f, X, 1, chunk=7)
    for t2 in range(rec.n_tokens):
        torch.testing.assert_close(cols[t2], exact_jacobians(f, X, t2, [1])[0],
                                   atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(cols[0]) == 0          # causal: J_{1 0} = 0
