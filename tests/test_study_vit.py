"""The ViT study (coupling.experiments.study.vit): data, stochastic depth, training, coupling, one grid row.

Real Hugging Face ViTs built from configs, real digits from scikit-learn; the stochastic-depth
hook is checked sample by sample against the block's own eval-mode output.
"""
import json
import math

import numpy as np
import pytest
import torch
from gap_tolerance import (EntryTolerance, assert_close_by_gap, depth_tolerance,
                           off_diagonal_mean)

pytest.importorskip("sklearn")

from coupling.analysis.prompt import analyze_prompt
from coupling.analysis.steps import layer_function
from coupling.experiments.study import stochastic_depth as sd  # noqa: E402
from coupling.experiments.study import vit  # noqa: E402
from coupling.model.loading import LoadedModel  # noqa: E402
from coupling.model.trajectory import run_forward  # noqa: E402
from coupling.settings.scan_settings import ScanSettings  # noqa: E402

TINY = dict(n_layer=2, d=16, n_head=2, patch_size=4, epochs=2, warmup_epochs=0)


@pytest.fixture(scope="module")
def data():
    return vit.load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny ViT after 2 epochs: (model, record)."""
    return vit.train_vit(vit.ViTSpec("tiny", **{**TINY, "n_layer": 3}), data,
                         threads=1, log=lambda *_: None)


def test_digits_split_is_stratified_standardized_and_deterministic(data):
    x_tr, y_tr, x_te, y_te = data
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-3
    # stratified: every class's share of the test set within one image of its overall share
    counts_te = np.bincount(y_te.numpy(), minlength=10)
    counts_all = counts_te + np.bincount(y_tr.numpy(), minlength=10)
    assert np.all(np.abs(counts_te - 0.2 * counts_all) <= 1)
    again = vit.load_digits_split(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    other = vit.load_digits_split(seed=1)
    assert not torch.equal(other[3], y_te)


def test_drop_path_rates_follow_the_timm_linear_rule():
    assert sd.drop_path_rates(6, 0.5) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert sd.drop_path_rates(6, 0.5) == pytest.approx(torch.linspace(0, 0.5, 6).tolist())


def _branch_check(block, x, p):
    """Per sample: 'skip' (output == input), 'keep' (input + branch / (1-p)), or neither."""
    block.eval()
    with torch.no_grad():
        ref = block(x)                           # eval mode: the hook leaves the block alone
        block.train()
        out = block(x)
    block.eval()
    branch = ref - x
    scale = float(branch.abs().max())
    skip = (out - x).abs().flatten(1).amax(1) <= 1e-6 * scale
    keep = (out - (x + branch / (1 - p))).abs().flatten(1).amax(1) <= 1e-5 * scale
    return skip, keep, out, ref


def test_stochastic_depth_skips_per_sample_with_the_stated_probability():
    spec = vit.ViTSpec("sd", **TINY)
    model = vit.build_vit(spec).requires_grad_(False)
    block = sd.vit_blocks(model)[1]
    p, n, passes = 0.3, 1000, 4
    torch.manual_seed(0)
    x = torch.randn(n, 5, spec.d)
    skipped = 0
    with sd.stochastic_depth(model, [0.0, p]):
        for _ in range(passes):
            skip, keep, _, _ = _branch_check(block, x, p)
            assert bool((skip ^ keep).all())     # every sample exactly one of the two
            assert 0 < int(skip.sum()) < n       # drawn per sample, not per batch
            skipped += int(skip.sum())
        # block 0 has rate 0: untouched in train mode
        first = sd.vit_blocks(model)[0]
        s0, k0, out0, ref0 = _branch_check(first, x, 0.0)
        assert torch.equal(out0, ref0)
    total = n * passes
    tol = 4 * math.sqrt(p * (1 - p) / total)     # 4 sigma of the binomial fraction
    assert abs(skipped / total - p) < tol, skipped / total
    # hooks removed on exit: train mode is the plain block again
    _, _, out, ref = _branch_check(block, x, p)
    assert torch.equal(out, ref)


def test_stochastic_depth_is_the_identity_in_eval_mode():
    model = vit.build_vit(vit.ViTSpec("sd", **TINY)).requires_grad_(False).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        plain = model(pixel_values=x).logits
        with sd.stochastic_depth(model, 0.9):
            hooked = model(pixel_values=x).logits
    assert torch.equal(plain, hooked)


def test_p_one_skips_every_block_so_the_model_is_embeddings_norm_head():
    model = vit.build_vit(vit.ViTSpec("sd", **TINY)).requires_grad_(False)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad(), sd.stochastic_depth(model, [1.0, 1.0]):
        model.train()
        logits = model(pixel_values=x).logits
        model.eval()
        expected = model.classifier(model.vit.layernorm(model.vit.embeddings(x))[:, 0])
        full = model(pixel_values=x).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(full, expected)    # the blocks do matter in eval mode


def test_tiny_vit_beats_chance_and_training_is_deterministic(data, trained):
    model, rec = trained
    assert rec["test_acc"] > 0.3                 # chance is 0.1 (360 images: sigma 0.016)
    assert len(rec["curve"]) == 2 and not model.training
    assert rec["params"] == sum(p.numel() for p in model.parameters())
    acc, loss = vit.evaluate(model, data[2], data[3])
    assert acc == rec["test_acc"] and loss == pytest.approx(rec["test_loss"])
    spec = vit.ViTSpec("tiny", **{**TINY, "n_layer": 3})
    again, _ = vit.train_vit(spec, data, threads=1, log=lambda *_: None)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), again.state_dict().values()))


def test_last_block_convention_holds_for_the_vit_classifier(data, trained):
    """X^L is the final layernorm of the last block's output (what the classifier reads) and
    X^L - X^{L-1} is the f^L whose Jacobian is taken."""
    model, _ = trained
    lm = vit.loaded_vit(model)
    x = data[2][:1]
    rec = run_forward(lm, {"pixel_values": x})
    assert rec.n_layers == 3 and rec.n_tokens == 5
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
        normed = model.vit.layernorm(hs[-1])[0]
        torch.testing.assert_close(rec.hidden_states[-1], normed)
        torch.testing.assert_close(model.classifier(rec.hidden_states[-1][:1]),
                                   model(pixel_values=x).logits)
        f = layer_function(rec, 3, ScanSettings(), model)
        step = f(rec.hidden_states[2][None])[0]
    torch.testing.assert_close(step, rec.hidden_states[3] - rec.hidden_states[2])


def test_vit_coupling_matches_the_library_scan(data, trained):
    model, _ = trained
    images = data[2][:3]
    cp = vit.vit_coupling(model, images, k=4)
    for key in ("mis_coupling", "mis_coupling_raw", "lss", "expodistance"):
        assert math.isfinite(cp[key]) and math.isfinite(cp[f"{key}_std"])
    assert 0.0 <= cp["mis_coupling"] <= 1.5 and 0.0 <= cp["mis_coupling_raw"] <= 1.5
    assert cp["coupling_matrix"].shape == (3, 3)
    # the library's scan, called here, with the paper authors' whole-prompt Jacobians
    lm = LoadedModel(model, None, model.config, {"n_layers": 3})
    settings = ScanSettings(k=4, token="all", jacobian="full", measures=("depth", "regularity"))
    ref = [analyze_prompt(lm, {"pixel_values": x[None]}, settings) for x in images]
    got = cp["per_image"]["mis_coupling"]
    want = [r.summary["depth_mis_coupling_mean"] for r in ref]
    # tolerances from the gaps of each image's Jacobian spectra (tests/gap_tolerance.py)
    tol = [depth_tolerance(lm, run_forward(lm, {"pixel_values": x[None]}), settings)
           for x in images]
    per_image = [off_diagonal_mean(t) for t in tol]
    assert_close_by_gap(got, want, [t.normalized for t in per_image],
                        [t.determined for t in per_image], "per-image m~", max_left_out=1.0,
                        require_one=False)
    grid = EntryTolerance.mean(tol)
    assert_close_by_gap(cp["coupling_matrix"], np.mean([r.depth_normalized for r in ref], axis=0),
                        grid.normalized, grid.determined, "mean depth m~")
    assert cp["mis_coupling_std"] == pytest.approx(np.std(want), abs=1e-6)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_run_vit_writes_a_result_that_the_saved_model_reproduces(tmp_path, data):
    spec = vit.ViTSpec("row", **{**TINY, "epochs": 1, "stochastic_depth": 0.2})
    row = vit.run_vit(spec, data, tmp_path / "row", k=4, n_images=2, threads=1,
                      log=lambda *_: None)
    keys = {"model", "seed", "stochastic_depth", "weight_decay", "n_layer", "d", "params",
            "test_acc", "test_loss", "mis_coupling", "mis_coupling_std", "mis_coupling_raw",
            "coupling", "lss", "expodistance", "undetermined_layers"}
    assert keys <= set(row)
    assert row["coupling"] == pytest.approx(1 - row["mis_coupling"])
    doc = json.loads((tmp_path / "row" / "result.json").read_text())
    assert doc["row"] == row and doc["spec"]["stochastic_depth"] == 0.2
    assert doc["training"]["drop_path_rates"] == pytest.approx([0.0, 0.2])
    assert not list((tmp_path / "row").glob(".*tmp*"))
    model = vit.load_vit(tmp_path / "row" / "model")
    acc, _ = vit.evaluate(model, data[2], data[3])
    assert acc == row["test_acc"]
    again = vit.vit_coupling(model, data[2][:2], k=4)
    assert again["mis_coupling"] == pytest.approx(row["mis_coupling"], abs=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(d=50, n_head=3), "not divisible by n_head"),
    (dict(patch_size=3), "does not divide"),
    (dict(stochastic_depth=1.0), r"stochastic_depth must be a number in \[0.0, 1.0\)"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr=0.0), "lr must be"),
    (dict(n_layer=1), "n_layer must be an integer >= 2"),
    (dict(epochs=2, warmup_epochs=3), "warmup_epochs=3 exceeds"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
])
def test_bad_specs_give_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        vit.ViTSpec("bad", **kw)
    assert "\n" not in str(e.value)


def test_bad_calls_give_one_line_errors(data, trained):
    model, _ = trained
    with pytest.raises(ValueError, match="K=20 is larger than the ViT width d=16"):
        vit.vit_coupling(model, data[2][:1], k=20)
    with pytest.raises(ValueError, match="needs 3 rates"):
        sd.add_stochastic_depth(model, [0.1, 0.2])
    with pytest.raises(ValueError, match="test_fraction"):
        vit.load_digits_split(test_fraction=1.5)
    with pytest.raises(ValueError, match="n_images"):
        vit.run_vit(vit.ViTSpec("x", **TINY), data, "/nonexistent/never", k=4, n_images=0)

