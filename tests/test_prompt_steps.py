"""The per-prompt step API (``coupling.analysis.steps``) that the local scan and the Ray stages
are both made of.

The steps are driven here by hand over two block ranges of a real tiny GPT-2, each range
seeing only its own blocks (a partial ``ForwardRecord``: real calls and states, nothing
else), exchanging only the ``d x K`` factors -- and must give ``analyze_prompt``'s result bit
for bit (CPU float32, tolerance 0).  The ranges' records come from the stages' own forward
(``ray_jobs.stage.StageModel``, which loads only its blocks) and are checked against the
slices of the whole model's record.
"""
import numpy as np
import pytest
import torch
from transformers import AutoConfig

from coupling.analysis import steps as ps
from coupling.analysis.prompt import analyze_prompt
from coupling.model.loading import load_model
from coupling.model.trajectory import ForwardRecord, run_forward
from coupling.model.zoo import save_random, small_config
from coupling.settings.scan_settings import ScanSettings
from ray_jobs.stage import StageModel, trajectory_of

RANGES = [(0, 2), (2, 4)]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = save_random(small_config("gpt2", n_layers=4, d=32, vocab=128, max_pos=32),
                         tmp_path_factory.mktemp("gpt2") / "m", seed=3)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    return folder, load_model(folder), AutoConfig.from_pretrained(folder), ids


def _by_hand(records, models, settings, prompt_id, meta) -> object:
    """One prompt through the steps, each block range with its own record and model only."""
    L = records[0].n_layers
    tokens = ps.traced_tokens(records[0].n_tokens, settings)
    kept, factors = [], []
    for rec, model in zip(records, models):           # step 2, range by range
        rec.cache["deflation"] = {}
        jac, fac, blocks, functions = {}, {}, {}, {}
        for t in tokens:
            jac[t], fac[t] = ps.decompose_token(rec, rec.layers, t, settings, model, blocks,
                                                functions)
        kept.append((jac, functions, dict(rec.cache["deflation"])))
        factors.append(fac)
    depth = []
    for i, (rec, (jac, functions, deflation)) in enumerate(zip(records, kept)):  # step 3
        rows, flags = [], []
        for t in tokens:
            svds = {l: s for fac in factors for l, s in fac[t].items()}
            grid, flag = ps.couple_token(jac[t], svds, L, settings.k)
            rows.append(grid)
            flags.append(flag)
        spectra = {l: factors[i][tokens[-1]][l] for l in rec.layers}
        depth.append(ps.depth_part(rows, flags, spectra, functions, deflation))
    l, lp = ps.token_layers(settings, L)
    owner = next(i for i, r in enumerate(records) if l in r.layers and lp in r.layers)
    tok = ps.token_grids(records[owner], settings, models[owner])
    traj = trajectory_of(r.states() for r in records)
    reg = ps.trajectory_regularity(traj, settings.lss_window,
                                   *ps.lens_heads(models[-1], settings.last_block))
    return ps.assemble(prompt_id, records[0].n_tokens, meta, depth, tok, reg)


def _assert_same(got, ref):
    for name in ("depth_normalized", "depth_raw", "singular_values", "next_singular_values",
                 "pca"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert list(got.summary) == list(ref.summary) and got.summary == ref.summary
    assert got.meta == ref.meta and got.jacobian_functions == ref.jacobian_functions
    assert got.deflation == ref.deflation
    for part in ("spectral_flags", "layers", "tokens"):
        a, b = getattr(got, part), getattr(ref, part)
        assert list(a) == list(b), part
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}[{key}]")


@pytest.mark.parametrize("last_block", ["with-final-norm", "raw"])
def test_steps_over_two_block_ranges_give_analyze_prompt(gpt2, last_block):
    folder, lm, config, ids = gpt2
    settings = ScanSettings(k=4, token="all", measures=("depth", "tokens", "regularity"),
                            token_layers=(3, 4), deflate_ln=True, last_block=last_block)
    ref = analyze_prompt(lm, ids, settings, "p", {"kind": "x"})
    assert ref.deflation and ref.depth_normalized.shape == (4, 4) and "entropy" in ref.layers

    full = run_forward(lm, ids, last_block=last_block)
    stages = [StageModel(folder, config, lo, hi) for lo, hi in RANGES]
    x, records = ids, []
    for st, (lo, hi) in zip(stages, RANGES):
        x, rec = st.forward(x, last_block)
        # the stage's record is the whole model's, cut to its blocks: nothing made up
        assert (rec.first, rec.n_layers, list(rec.layers)) == (lo, 4, list(range(lo + 1, hi + 1)))
        assert torch.equal(rec.hidden_states, full.hidden_states[lo:hi + 1])
        for l in rec.layers:
            assert torch.equal(rec.call(l).input, full.call(l).input)
        records.append(rec)
    got = _by_hand(records, [st.model for st in stages], settings, "p", {"kind": "x"})
    _assert_same(got, ref)

    # the same steps on slices of the whole model's record (the model itself per range)
    sliced = [ForwardRecord(full.hidden_states[lo:hi + 1], full.calls[lo:hi], full.block_path,
                            full.raw_last if hi == 4 else None, full.last_block,
                            full.final_norm if hi == 4 else None, first=lo, model_layers=4)
              for lo, hi in RANGES]
    _assert_same(_by_hand(sliced, [lm.model] * 2, settings, "p", {"kind": "x"}), ref)


def test_a_range_record_refuses_the_layers_it_does_not_hold(gpt2):
    folder, lm, config, ids = gpt2
    first = StageModel(folder, config, 0, 2)
    x, _ = first.forward(ids)
    stage = StageModel(folder, config, 2, 4)
    _, rec = stage.forward(x)
    assert rec.hidden_states.shape[0] == 3 and torch.isfinite(rec.hidden_states).all()
    assert sorted(rec.states()) == [2, 3, 4] and len(rec.calls) == 2
    with pytest.raises(ValueError, match=r"layer 1 is not in this record \(it holds layers "
                                         r"3\.\.4 of 4\)"):
        rec.call(1)
    settings = ScanSettings(k=4, token_layers=(1, 2), measures=("tokens",))
    with pytest.raises(ValueError, match="layer 1 is not in this record"):
        ps.token_grids(rec, settings, stage.model)
    with pytest.raises(ValueError, match="layer 2 is not in this record"):
        ps.decompose_token(rec, [2, 3], 5, settings, stage.model)
    # the middle of the model holds no head: regularity is the last stage's alone
    with pytest.raises(RuntimeError, match="last stage only"):
        first.regularity(torch.zeros(5, 6, 32), settings)


def test_token_layers_and_traced_tokens_are_decided_once():
    s = ScanSettings(k=2)
    assert ps.token_layers(s, 4) == (2, 3) and ps.token_layers(s, 1) == (1, 1)
    assert ps.token_layers(ScanSettings(k=2, token_layers=(1, 4)), 4) == (1, 4)
    assert ps.traced_tokens(5, s) == [4]
    assert ps.traced_tokens(3, ScanSettings(k=2, token="all")) == [0, 1, 2]
