"""The depth-streaming scan (``coupling.analysis.depth_passes``): one block in compute
precision at a time, the same numbers as taking every block's Jacobians at once.

Reference: the depth-wise measure as it was computed before streaming -- every layer's
Jacobians of a traced token held together (``decompose_token`` over all layers, then
``couple_token``).  The streaming scan does the same arithmetic in another order, so the
comparison is exact (tolerance 0), on the resident model (a bf16 block copied to float32 for
its turn) and on the model read from disk one block at a time (the bf16 tensors read straight
into float32: the same conversion).
"""
import numpy as np
import pytest
import torch

from coupling.analysis import steps as ps
from coupling.analysis.depth_passes import couple_layers, decompose_layers
from coupling.analysis.prompt import analyze_prompt
from coupling.model.block_range import StreamedModel
from coupling.model.loading import load_model
from coupling.model.trajectory import run_forward
from coupling.model.zoo import save_random, small_config
from coupling.settings.scan_settings import ScanSettings


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama (GQA, rotary) saved in float32, scanned in bf16: loaded whole, and
    opened block by block (each tensor read as bf16, then upcast for its turn)."""
    config = small_config("llama", n_layers=4, d=32, heads=4, vocab=96, max_pos=32)
    folder = save_random(config, tmp_path_factory.mktemp("llama") / "m", seed=5)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    return (load_model(folder, dtype="bfloat16"), StreamedModel(folder, dtype="bfloat16"), ids)


def _all_at_once(lm, ids, settings):
    """The depth part as before streaming: all layers' Jacobians of a token held together."""
    record = run_forward(lm, ids, last_block=settings.last_block)
    L = record.n_layers
    rows, flags, blocks, functions = [], [], {}, {}
    record.cache["deflation"] = {}
    for t in ps.traced_tokens(record.n_tokens, settings):
        jac, svds = ps.decompose_token(record, range(1, L + 1), t, settings, lm.model, blocks,
                                       functions)
        grid, flag = ps.couple_token(jac, svds, L, settings.k)
        rows.append(grid)
        flags.append(flag)
    part = ps.depth_part(rows, flags, svds, functions, record.cache["deflation"])
    return ps.assemble("p", record.n_tokens, {}, [part])


DEPTH_FIELDS = ("depth_normalized", "depth_raw", "singular_values", "next_singular_values")


def _same_depth(got, ref):
    for name in DEPTH_FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    for key in ref.spectral_flags:
        np.testing.assert_array_equal(got.spectral_flags[key], ref.spectral_flags[key])
    assert got.jacobian_functions == ref.jacobian_functions and got.deflation == ref.deflation


def _same(got, ref):
    _same_depth(got, ref)
    assert got.summary == ref.summary
    for part in ("layers", "tokens"):
        a, b = getattr(got, part), getattr(ref, part)
        assert list(a) == list(b), part
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}[{key}]")
    np.testing.assert_array_equal(got.pca, ref.pca)


@pytest.mark.parametrize("svd, token", [("auto", "all"), ("lanczos", "last")])
def test_streaming_gives_the_all_at_once_numbers_in_memory_and_from_disk(llama, svd, token):
    lm, streamed, ids = llama
    settings = ScanSettings(k=4, svd=svd, token=token, token_layers=(2, 3),
                            measures=("depth", "tokens", "regularity"))
    ref = _all_at_once(lm, ids, settings)
    assert np.isfinite(ref.depth_normalized).all() and ref.depth_normalized.shape == (4, 4)
    resident = analyze_prompt(lm, ids, settings, "p")
    _same_depth(resident, ref)
    from_disk = analyze_prompt(streamed, ids, settings, "p")
    _same(from_disk, resident)
    assert all(p.device.type == "meta" for p in streamed.blocks.blocks.parameters())


def test_dense_jacobians_rebuilt_in_pass_two_give_the_kept_ones(llama):
    lm, _, ids = llama
    settings = ScanSettings(k=3, token="all")
    record = run_forward(lm, ids)
    layers = range(1, 5)
    parts = []
    for keep in (True, False):
        kept, factors = decompose_layers(record, layers, settings, lm.model, keep_dense=keep)
        assert (kept["J"] is not None) == keep
        parts.append(couple_layers(record, layers, kept, [factors], settings, lm.model))
    for v in ("normalized", "raw"):
        np.testing.assert_array_equal(parts[0][v], parts[1][v])
    assert parts[0]["flags"] == parts[1]["flags"]


def test_a_stream_with_deflation_reads_blocks_in_the_model_dtype(llama):
    lm, streamed, ids = llama
    settings = ScanSettings(k=4, deflate_ln=True, measures=("depth",))
    _same_depth(analyze_prompt(streamed, ids, settings), analyze_prompt(lm, ids, settings))


def test_no_compute_copy_outlives_its_block_without_the_cycle_collector(llama):
    """The float32 copy of a bf16 block must go when its block is done, by reference
    counting: the memoised functions close over their FastBlock (a cycle), and when freeing
    waited for ``gc`` the copies piled up, +1.8 GB per d = 4096 block in memory mode."""
    import gc

    lm, _, ids = llama
    record = run_forward(lm, ids)
    settings = ScanSettings(k=3, measures=("depth",))
    resident = {id(m) for m in lm.model.modules()}
    block_type = type(lm.model.model.layers[0])

    def copies():       # float32 blocks that are not the model's (bf16) own
        return [o for o in gc.get_objects() if type(o) is block_type and id(o) not in resident
                and next(o.parameters()).dtype == torch.float32]

    gc.collect()
    gc.disable()
    try:
        kept, factors = decompose_layers(record, range(1, 5), settings, lm.model)
        assert copies() == []
        couple_layers(record, range(1, 5), kept, [factors], settings, lm.model)
        assert copies() == []
    finally:
        gc.enable()
