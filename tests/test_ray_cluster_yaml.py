"""``cluster.yaml`` against the Ray cluster launcher's own schema and checks, offline.

``jsonschema`` (installed with ``ray[default]``) validates it against
``ray/autoscaler/ray-schema.json``; ``prepare_config`` (merges the AWS defaults, fills node
type limits) and ``validate_config`` are the launcher's own functions and need no cloud
credentials.  The placement planner is then run on the node types the file declares.
"""
import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from coupling.settings.scan_settings import ScanSettings
from ray_jobs.placement import launchable_nodes, plan_placement
from ray_jobs.sizing import GB, ModelSizes

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def schema():
    import ray.autoscaler
    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json")
                      .read_text())


def test_cluster_yaml_passes_the_launcher_schema_and_checks(cluster, schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster, schema)
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head.cpu" and types["head.cpu"]["max_workers"] == 0
    assert types["head.cpu"]["resources"] == {"CPU": 0}          # no model work on the head
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert {v["node_config"]["InstanceType"] for v in gpu.values()} == \
        {"g5.xlarge", "g5.12xlarge", "p4d.24xlarge"}
    for v in gpu.values():                                       # 24 GB per A10G, 40 per A100
        per_gpu = v["resources"]["gpu_memory_gb"] / v["resources"]["GPU"]
        assert per_gpu == (40 if v["node_config"]["InstanceType"].startswith("p4d") else 24)
    assert prepared["idle_timeout_minutes"] > 0 and prepared["max_workers"] >= 1
    assert prepared["file_mounts"] == {"~/coupling": "."}
    assert any("pip install" in c and "-e ." in c for c in prepared["setup_commands"])
    # the launcher merged the common setup into the head's and the workers' commands
    assert prepared["head_setup_commands"][:len(cluster["setup_commands"])] == \
        cluster["setup_commands"]
    assert all("127.0.0.1" in c for c in prepared["head_start_ray_commands"] if "--head" in c)


def test_schema_rejects_a_broken_cluster_yaml(cluster, schema):
    bad = copy.deepcopy(cluster)
    bad["idle_timeout_minute"] = 5                         # typo: unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu.24gb.x1"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_planner_on_the_declared_node_types(cluster):
    nodes = launchable_nodes(cluster)
    assert len([n for n in nodes if n.gpus == 1]) == 8 and all(n.gpu_memory for n in nodes)
    s = ScanSettings(k=10, svd="lanczos", chunk=8)     # wide models: small JVP chunks

    def llama(n_layers, d, ffn, vocab=32000, kv=8, heads=64):
        block = 2 * (4 * d * d * (1 + kv / heads) / 2 + 3 * d * ffn)   # bf16 bytes
        return ModelSizes([int(block)] * n_layers, 2 * vocab * d, 2 * vocab * d + 2 * d,
                          int(block * n_layers + 4 * vocab * d), d)

    seven_b = llama(32, 4096, 11008, kv=32, heads=32)               # ~13 GB
    p = plan_placement(seven_b, s, 256, nodes, n_shards=100)
    assert p.kind == "replicas" and p.gpus == 1
    seventy_b = llama(80, 8192, 28672)                              # ~138 GB
    p = plan_placement(seventy_b, s, 256, nodes, n_shards=100)
    assert p.kind == "replicas" and p.gpus == 4 and p.n_actors == 2  # 4 x 40 GB per copy
    mixed = plan_placement(llama(30, 8192, 28672), s, 256, nodes, n_shards=100)  # ~53 GB
    # 3 x 24 GB on a g5.12xlarge, 2 x 40 GB on the p4d: 3 GPUs per copy everywhere
    assert mixed.kind == "replicas" and mixed.gpus == 3
    assert mixed.n_actors == 2 * (4 // 3) + 8 // 3
    small_only = [n for n in nodes if n.gpus == 1]                  # eight 24 GB nodes
    p = plan_placement(seventy_b, s, 256, small_only, n_shards=100)
    assert p.kind == "stages" and p.n_actors == 7                   # the fewest that fit
    assert max(p.stage_memory) <= 24 * GB
    p = plan_placement(seventy_b, s, 256, small_only, stages=8)
    assert [hi - lo for lo, hi in p.ranges] == [10] * 8
