"""The last block (paper Eq. 7): the function whose Jacobian is taken and the trajectory's X^L
must describe the same map, X^L - X^{L-1} = f^L(X^{L-1}) at every token, by default (final
norm inside F^L) and with --raw-last-block."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from coupling import block_jacobian
from coupling.analysis.prompt import analyze_prompt
from coupling.analysis.steps import layer_function
from coupling.cli import main
from coupling.model.loading import TINY_MODEL_DIR, LoadedModel, load_model
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, save_random, small_config
from coupling.scan import ScanConfig
from coupling.settings.scan_settings import ScanSettings

FAMILIES = ["gpt2", "llama", "gpt_neox", "bert"]


def _lm(family):
    cfg = small_config(family, n_layers=3, d=32)
    return LoadedModel(build_random(cfg, seed=1), None, cfg, {"n_layers": 3})


def _step_matches_f(lm, last_block):
    rec = run_forward(lm, random_inputs(lm.config.model_type, n_tokens=7), last_block=last_block)
    L = rec.n_layers
    f = layer_function(rec, L, ScanSettings(last_block=last_block), lm.model)
    X = rec.hidden_states[L - 1][None]
    step = rec.hidden_states[L] - rec.hidden_states[L - 1]
    with torch.no_grad():
        got = f(X)[0]
    scale = float(step.abs().max())
    per_token = (got - step).abs().amax(-1) / scale
    return rec, per_token


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("last_block", ["with-final-norm", "raw"])
def test_last_step_is_the_function_whose_jacobian_is_taken(family, last_block):
    lm = _lm(family)
    rec, per_token = _step_matches_f(lm, last_block)
    assert (per_token < 1e-5).all(), per_token       # every token
    # and the two conventions really differ where there is a final norm
    other = run_forward(lm, random_inputs(family, n_tokens=7),
                        last_block="raw" if last_block != "raw" else "with-final-norm")
    differs = not torch.allclose(other.hidden_states[-1], rec.hidden_states[-1])
    assert differs == (family != "bert")             # BERT has no final norm
    torch.testing.assert_close(other.hidden_states[:-1], rec.hidden_states[:-1])


def test_the_old_default_mixed_two_functions():
    """Raw f^L against the post-norm X^L (the old default): the identity fails."""
    lm = _lm("gpt2")
    rec = run_forward(lm, random_inputs("gpt2", n_tokens=7))      # X^L after the final norm
    f_raw = layer_function(rec, 3, ScanSettings(last_block="raw"), lm.model)
    with torch.no_grad():
        got = f_raw(rec.hidden_states[2][None])[0]
    assert (got - (rec.hidden_states[3] - rec.hidden_states[2])).abs().max() > 0.1


def test_public_block_jacobian_follows_the_record():
    lm = _lm("gpt2")
    ids = random_inputs("gpt2", n_tokens=5)
    eye = torch.eye(32)
    for last_block in ("with-final-norm", "raw"):
        rec = run_forward(lm, ids, last_block=last_block)
        f = layer_function(rec, 3, ScanSettings(last_block=last_block), lm.model)
        X = rec.hidden_states[2][None]
        ref = torch.func.jacrev(lambda x: f(x)[0, -1])(X)[:, 0, -1, :]   # (d_out, d_in)
        J = block_jacobian(rec, 3) @ eye
        assert torch.allclose(J, ref, atol=1e-5 * float(ref.abs().max())), last_block


def test_settings_alias_and_manifest_config():
    assert ScanSettings().last_block == "with-final-norm"
    with pytest.warns(DeprecationWarning, match="last_block: raw"):
        assert ScanSettings(final_norm_in_last=False).last_block == "raw"
    with pytest.warns(DeprecationWarning):
        s = ScanConfig.from_dict({"final_norm_in_last": True}).settings
    assert s.last_block == "with-final-norm"
    d = s.to_dict()
    assert d["last_block"] == "with-final-norm" and "final_norm_in_last" not in d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ScanSettings(**d).last_block == "with-final-norm"   # round trip, no warning
    with pytest.raises(ValueError, match="contradicts"):
        ScanSettings(last_block="raw", final_norm_in_last=True)
    with pytest.raises(ValueError, match="last_block must be one of"):
        ScanSettings(last_block="normed")


def test_logit_lens_of_the_last_layer_is_the_same_either_way():
    """X^L raw goes through norm + unembedding, X^L normed through the unembedding alone."""
    lm = _lm("gpt2")
    ids = random_inputs("gpt2", n_tokens=6)["input_ids"]
    a = analyze_prompt(lm, ids, ScanSettings(k=3, measures=("regularity",)))
    b = analyze_prompt(lm, ids, ScanSettings(k=3, measures=("regularity",), last_block="raw"))
    assert a.layers["entropy"][-1] == pytest.approx(b.layers["entropy"][-1], rel=1e-5)
    assert a.layers["norm"][-1] != pytest.approx(b.layers["norm"][-1], rel=1e-3)
    np.testing.assert_array_equal(a.layers["norm"][:-1], b.layers["norm"][:-1])


@pytest.mark.parametrize("last_block", ["with-final-norm", "raw"])
def test_pipeline_stages_follow_the_setting(tmp_path, last_block):
    """The Ray path (stages in this process, the same messages) equals the local analysis."""
    from transformers import AutoConfig

    from ray_jobs.stage import StageModel, run_pipeline
    folder = save_random(small_config("gpt2", n_layers=3, d=32, vocab=128, max_pos=32),
                         tmp_path / "m", seed=1)
    lm, config = load_model(folder), AutoConfig.from_pretrained(folder)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    settings = ScanSettings(k=4, last_block=last_block, measures=("depth", "regularity"))
    ref = analyze_prompt(lm, ids, settings)
    got = run_pipeline([StageModel(folder, config, 0, 2), StageModel(folder, config, 2, 3)],
                       ids, settings)
    np.testing.assert_array_equal(got.depth_normalized, ref.depth_normalized)
    for key in ("norm", "entropy"):
        np.testing.assert_array_equal(got.layers[key], ref.layers[key])
    for key in ("depth_mis_coupling_mean", "depth_mis_coupling_raw_mean", "lss", "lss_last",
                "expodistance", "expodistance_last"):
        assert got.summary[key] == ref.summary[key], key


def test_cli_flag_and_manifest(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    folder = save_random(small_config("gpt2", n_layers=2, d=32, vocab=len(tok), max_pos=64),
                         tmp_path / "m", tokenizer=tok)
    norms = {}
    for name, flags in (("default", []), ("raw", ["--raw-last-block"])):
        out = tmp_path / name
        rc = main(["scan", "--model", folder, "--max-prompts", "1", "--k", "3", "--no-figures",
                   "--out", str(out)] + flags)
        assert rc == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["last_block"] == ("raw" if flags else "with-final-norm")
        norms[name] = pd.read_parquet(out / "layers.parquet")["norm"].to_numpy()
    assert norms["default"][-1] != pytest.approx(norms["raw"][-1], rel=1e-3)
    np.testing.assert_array_equal(norms["default"][:-1], norms["raw"][:-1])
