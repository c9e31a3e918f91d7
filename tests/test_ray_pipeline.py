"""Block-range stages, placement, config and shard store: everything that needs no cluster.

The stage pipeline runs in this process (``ray_jobs.stage.run_pipeline``: the same messages
the Ray actors exchange) and must give the local ``analyze_prompt`` result bit for bit on
CPU float32 (tolerance 0): same blocks, same recorded arguments, same Jacobians and SVDs.
"""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from coupling.analysis.prompt import analyze_prompt
from coupling.model.blocks import find_blocks, find_final_norm
from coupling.model.loading import load_model
from coupling.model.zoo import save_random, small_config
from coupling.results.store import Shard, ShardStore
from coupling.settings.scan_settings import ScanSettings
from ray_jobs.config import parse_config
from ray_jobs.placement import NodeInfo, plan_placement
from ray_jobs.reduce import model_row
from ray_jobs.sizing import GB, PROCESS_OVERHEAD, ModelSizes, PlacementError, balanced_ranges
from ray_jobs.stage import StageModel, run_pipeline


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "m"
    save_random(small_config(request.param, n_layers=4, d=32, vocab=128, max_pos=32), folder,
                seed=1)
    lm = load_model(folder)
    from transformers import AutoConfig
    return request.param, str(folder), lm, AutoConfig.from_pretrained(folder)


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("token", ["last", "all"])
def test_stages_reproduce_analyze_prompt_exactly(family_model, token):
    _, folder, lm, config = family_model
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    settings = ScanSettings(k=4, token=token, measures=("depth", "regularity", "tokens"),
                            token_layers=(2, 3), deflate_ln=token == "all")
    ref = analyze_prompt(lm, ids, settings, "p", {"kind": "x"})
    for ranges in ([(0, 1), (1, 3), (3, 4)], [(0, 3), (3, 4)]):
        stages = [StageModel(folder, config, lo, hi) for lo, hi in ranges]
        got = run_pipeline(stages, ids, settings, "p", {"kind": "x"})
        for name in ("depth_normalized", "depth_raw", "singular_values", "next_singular_values",
                     "pca"):
            _equal(getattr(got, name), getattr(ref, name))
        assert set(got.spectral_flags) == set(ref.spectral_flags) == {"undetermined", "svd_fallback"}
        for key in ref.spectral_flags:
            _equal(got.spectral_flags[key], ref.spectral_flags[key])
        assert got.summary == ref.summary and list(got.summary) == list(ref.summary)
        assert got.meta == ref.meta
        assert got.jacobian_functions == ref.jacobian_functions
        assert got.deflation == ref.deflation and bool(ref.deflation) == settings.deflate_ln
        for key in ref.layers:
            _equal(got.layers[key], ref.layers[key])
        for key in ref.tokens:
            _equal(got.tokens[key], ref.tokens[key])


def test_each_stage_holds_only_its_parameters(family_model):
    family, folder, lm, config = family_model
    model = lm.model
    _, blocks = find_blocks(model)
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    embed = [model.get_input_embeddings()] + ([model.transformer.wpe] if family == "gpt2" else [])
    head = [find_final_norm(model), model.get_output_embeddings()]
    for lo, hi in [(0, 1), (1, 3), (3, 4)]:
        st = StageModel(folder, config, lo, hi)
        expect = count(blocks[lo:hi]) + (count(embed) if lo == 0 else 0) \
            + (count(head) if hi == 4 else 0)
        assert st.n_params == expect
        assert st.bytes_read == 4 * expect            # only owned keys read (float32)
        held = {n for n, p in st.model.named_parameters() if p.device.type != "meta"}
        assert all(any(n.startswith(f"{st.layout.block_path}.{i}.") for i in range(lo, hi))
                   for n in held if ".h." in n or ".layers." in n)
    # the middle stage holds no embedding and no head
    mid = StageModel(folder, config, 1, 3)
    assert mid.model.get_input_embeddings().weight.device.type == "meta"
    assert mid.model.get_output_embeddings().weight.device.type == "meta"


def _sizes(blocks, emb=5, head=7, d=64):
    return ModelSizes(list(blocks), emb, head, sum(blocks) + emb + head, d)


def test_balanced_ranges_minimise_the_largest_stage():
    rng = np.random.default_rng(0)
    for trial in range(20):
        L = int(rng.integers(2, 8))
        sizes = _sizes(rng.integers(1, 20, L).tolist(), int(rng.integers(0, 30)),
                       int(rng.integers(0, 30)))
        for S in range(1, L + 1):
            got = balanced_ranges(sizes, S)
            assert got[0][0] == 0 and got[-1][1] == L and len(got) == S
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(got, got[1:] + [(L, L + 1)]))
            brute = min(max(sizes.stage_bytes(lo, hi) for lo, hi in zip((0,) + c, c + (L,)))
                        for c in itertools.combinations(range(1, L), S - 1))
            assert max(sizes.stage_bytes(lo, hi) for lo, hi in got) == brute
    with pytest.raises(PlacementError, match="between 1 and"):
        balanced_ranges(_sizes([1, 2]), 3)


def test_placement_replicas_when_a_copy_fits_else_stages():
    s = ScanSettings(k=4, svd="lanczos")         # matrix-free: working memory is tiny
    model = _sizes([GB] * 8, emb=GB // 2, head=GB // 2, d=4096)   # 9 GB of weights
    cpu = lambda mem_gb, n=2: [NodeInfo(f"n{i}", 8, 0, mem_gb * GB) for i in range(n)]  # noqa
    p = plan_placement(model, s, 32, cpu(32), n_shards=100)
    assert p.kind == "replicas" and p.n_actors == 2 * 3      # 3 copies of ~9.5 GB per 32 GB node
    assert plan_placement(model, s, 32, cpu(32), n_shards=4).n_actors == 4  # never > shards
    # stage memory = weights + 0.5 GB of JVP activations + 0.5 GB process + ~20 MB held
    p = plan_placement(model, s, 32, cpu(4.25, n=4))            # a copy needs 10 GB
    assert p.kind == "stages" and p.n_actors == 4 and p.ranges == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert 3.5 * GB < max(p.stage_memory) < 3.55 * GB
    with pytest.raises(PlacementError, match="cannot be placed"):
        plan_placement(model, s, 32, cpu(1))                     # one block + overhead > 1 GB
    with pytest.raises(PlacementError, match="add nodes"):
        plan_placement(model, s, 32, cpu(4.25, n=2))             # 4 stages, 2 nodes
    p = plan_placement(model, s, 32, cpu(32), stages=3)
    assert p.kind == "stages" and len(p.ranges) == 3 and p.reason == "forced by config"
    gpu = [NodeInfo("g", 48, 4, 190 * GB, 24 * GB)]
    p = plan_placement(model, s, 32, gpu, n_shards=10)
    assert p.kind == "replicas" and p.gpus == 1 and p.n_actors == 4
    big = _sizes([5 * GB] * 20, emb=GB, head=GB, d=8192)         # 102 GB: > a 4 x 24 GB node
    p = plan_placement(big, s, 32, gpu * 3, n_shards=10)
    assert p.kind == "stages" and p.gpus == 1 and p.n_actors == 5
    assert max(p.stage_memory) <= 24 * GB
    with pytest.raises(PlacementError, match="at most"):
        plan_placement(model, s, 32, cpu(32), replicas=9)


def test_exact_svd_working_memory_counts_dense_jacobians():
    s = ScanSettings(k=4, svd="exact")
    model = _sizes([1000] * 4, d=1024)
    p = plan_placement(model, s, 16, [NodeInfo("n", 4, 0, 64 * GB)], n_shards=1)
    transient = 64 * 16 * 1024 * 4 * 16                        # one JVP chunk through a block
    held = 4 * (1024 * 1024 * 4 + 16 * 1024 * 4 * 2)            # dense J + block in/out per layer
    assert p.memory == model.whole + transient + held + PROCESS_OVERHEAD


def test_config_validation_is_one_line(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    ok = {"models": [{"path": str(folder)}], "k": 3}
    cfg = parse_config({**ok, "stages": 2, "shard_size": 3}, out=str(tmp_path / "o"))
    assert len(cfg.jobs) == 1 and cfg.jobs[0].stages == 2 and cfg.options.shard_size == 3
    assert cfg.jobs[0].scan.settings.k == 3
    multi = parse_config({"models": [{"id": "org/a", "revisions": ["s1", "s2"]},
                                     {"path": str(folder), "replicas": 2}]}, out="o")
    assert [j.key for j in multi.jobs][:2] == ["org--a@s1", "org--a@s2"]
    assert multi.jobs[2].replicas == 2
    cases = [({**ok, "colour": 1}, "unknown config key"),
             ({"models": [{"path": str(folder), "size": 1}]}, "unknown key"),
             ({"models": [{"path": str(folder), "id": "x"}]}, "exactly one of"),
             ({"models": [{"path": str(tmp_path / "nope")}]}, "does not exist"),
             ({**ok, "stages": 2, "replicas": 2}, "not both"),
             ({**ok, "placement": "everywhere"}, "placement must be"),
             ({**ok, "stages": 0}, "positive integer"),
             ({**ok, "measures": "depth,colour"}, "unknown measure"),
             ({"models": [{"path": str(folder)}, {"path": str(folder)}]}, "listed twice"),
             ({"models": []}, "non-empty list"),
             ({"model": "x", "models": [{"id": "y"}]}, "not both")]
    for data, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            parse_config(data, out="o")
        assert "\n" not in str(e.value)


def test_models_row_keeps_the_summary_names_and_signs():
    summary = pd.DataFrame({"depth_mis_coupling_mean": [0.2, 0.4, 0.9],
                            "depth_mis_coupling_raw_mean": [1.0, 2.0, 3.0],
                            "lss": [2.0, 3.0, 4.0], "expodistance": [0.1, 0.2, 0.3]})
    job = parse_config({"model": "org/m", "revision": "r1"}, out="o").jobs[0]
    info = {"id": "org/m", "n_params": 10, "n_layers": 2, "d_model": 8, "dtype": "float32"}
    row = model_row(job, info, summary)
    assert row["mis_coupling_mean"] == pytest.approx(0.5)
    assert row["mis_coupling_raw_mean"] == pytest.approx(2.0)
    assert row["mis_coupling_std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert not any(c.startswith("coupling") for c in row)   # no second name, no second sign
    assert row["lss_mean"] == 3.0 and row["n_prompts"] == 3 and row["revision"] == "r1"


def test_shard_store_is_atomic_and_checks_its_plan(tmp_path):
    from coupling.analysis.steps import PromptResult
    store = ShardStore(tmp_path / "_shards" / "m")
    store.check_plan({"shards": [["a", "b"], ["c"]]})
    shards = [Shard(0, ["a", "b"], [[1], [2]], [{}, {}]), Shard(1, ["c"], [[3]], [{}])]
    assert store.done(shards) == set()
    store.write(shards[1], [PromptResult("c", 1, {}, {"x": 1.0}, {})])
    assert store.done(shards) == {1}
    assert not list(store.root.glob(".*tmp*"))          # the temporary file was renamed
    with pytest.raises(RuntimeError, match="do not match"):
        store.write(shards[0], [PromptResult("z", 1, {}, {}, {})])
    (store.root / ".shard-00000.npz.tmp-1").write_bytes(b"half")   # a killed writer's leftover
    store.clean_partial()
    assert not list(store.root.glob(".*tmp*"))
    with pytest.raises(ValueError, match="holds shards of a different scan"):
        store.check_plan({"shards": [["a"], ["b", "c"]]})


def test_one_token_products_shrink_the_working_memory_estimate():
    from ray_jobs.sizing import chunk_memory
    d, n = 4096, 256
    causal = ModelSizes([GB] * 4, 1, 1, 4 * GB + 2, d, causal=True)
    encoder = ModelSizes([GB] * 4, 1, 1, 4 * GB + 2, d, causal=False)
    local, full = ScanSettings(), ScanSettings(jacobian="full")
    assert chunk_memory(causal, n, local) == 128 * 2 * d * 4 * 16      # one token (+ prefix)
    assert chunk_memory(encoder, n, local) == 64 * n * d * 4 * 16      # falls back: whole prompt
    assert chunk_memory(causal, n, full) == 64 * n * d * 4 * 16
    assert chunk_memory(causal, n, ScanSettings(measures="depth,tokens")) == 64 * n * d * 4 * 16
    assert chunk_memory(causal, n, ScanSettings(chunk=8)) == 8 * 2 * d * 4 * 16


def test_forced_stage_count_that_does_not_fit_says_use_more_stages():
    s = ScanSettings(k=4, svd="lanczos")
    model = _sizes([GB] * 8, emb=GB // 2, head=GB // 2, d=4096)
    nodes = [NodeInfo(f"n{i}", 8, 0, 4.25 * GB) for i in range(8)]
    with pytest.raises(PlacementError, match="with stages=2: the largest stage needs .* use more"):
        plan_placement(model, s, 32, nodes, stages=2)


# Nodes as ``ray.nodes()`` reports them (Ray 2.60; a 2-CPU machine, and a 2-GPU A10G node)
RAY_CPU_NODE = {"NodeID": "928029504566279c6555efb09defad71bfce7fb9e7f1ac266308bfbe",
                "Alive": True, "Resources": {"node:__internal_head__": 1.0,
                                             "node:127.0.0.1": 1.0, "memory": 13409042842.0,
                                             "object_store_memory": 5746732646.0, "CPU": 2.0}}
RAY_GPU_NODE = {"NodeID": "5f0c2b1e9a7d4c3b8e6f1a2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f",
                "Alive": True, "Resources": {"node:10.0.0.7": 1.0, "memory": 60e9, "CPU": 8.0,
                                             "GPU": 2.0, "accelerator_type:A10G": 1.0}}


def test_placement_errors_name_the_short_resource_per_node_and_its_setting():
    from ray_jobs.placement import node_info

    s = ScanSettings(k=4)
    small = _sizes([10 ** 6] * 4, d=32)
    cpu, gpu = node_info(RAY_CPU_NODE), node_info(RAY_GPU_NODE)

    def error(*args, **kw) -> str:
        with pytest.raises(PlacementError) as e:
            plan_placement(*args, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    # 3 stages on one 2-CPU node: its CPUs (1 per stage) are the limit, not its memory
    msg = error(small, s, 16, [cpu], placement="stages", stages=3, model_name="m")
    assert "room for at most 2 of 3, short of CPUs (node 92802950: 2 CPUs -> 2, 12.5 GB -> " in msg
    assert "ray start --num-cpus" in msg and "cpus_per_actor (now 1)" in msg
    assert "fewer stages (stages: 2)" in msg
    msg = error(small, s, 16, [cpu], placement="replicas", replicas=2, cpus_per_actor=1.5)
    assert "room for at most 1 of 2, short of CPUs (node 92802950: 2 CPUs -> 1" in msg
    assert "cpus_per_actor (now 1.5)" in msg
    # memory: a copy bigger than the node
    big = _sizes([4 * GB] * 4, d=32)
    msg = error(big, s, 16, [cpu], placement="replicas", model_name="m")
    assert "short of memory (node 92802950: 2 CPUs -> 2, 12.5 GB -> 0)" in msg
    assert "node_memory_gb" in msg and "placement 'stages'" in msg
    # GPUs: one stage per GPU, two GPUs
    msg = error(small, s, 16, [gpu], placement="stages", stages=3)
    assert "short of GPUs (node 5f0c2b1e: 2 GPUs -> 2, 24 GB each -> enough)" in msg
    assert "add GPU nodes" in msg
