"""Memory as an output of the scan: the peak predicted before loading
(``coupling.analysis.memory_plan``) against the peak measured in a real scan, the mode it
picks, and the one-line error when even one block at a time cannot fit.

Each measured scan runs in a fresh interpreter (``coupling.model.memory`` reads its
``VmHWM`` from the start of the scan), on a random Llama whose embedding and head (32k x 1024)
are ~260 MB, so the weights dominate what is measured above the interpreter's baseline
(the process's resident set when the scan starts, also measured and subtracted).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from coupling.analysis.memory_plan import MemoryPlanError, param_counts, plan
from coupling.model.loading import TINY_MODEL_DIR, load_config
from coupling.model.zoo import save_random, small_config
from coupling.settings.scan_settings import ScanSettings

MEASURE = """
import json, sys
from coupling.scan import scan
folder, weights, out = sys.argv[1:4]
r = scan(folder, weights=weights, max_prompts=1, k=4, figures=False, out=out, progress=False)
print("MEMORY " + json.dumps(r.manifest["memory"]))
"""


def _llama(folder, n_layers: int) -> str:
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    cfg = small_config("llama", n_layers=n_layers, d=1024, heads=16, vocab=32000, ffn=2816,
                       max_pos=256)
    return save_random(cfg, folder, seed=1, tokenizer=tok)


def _measured_scan(folder, weights, out) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder), weights, str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MEMORY "))
    return json.loads(line[len("MEMORY "):])


def _env():
    import os
    return dict(os.environ)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """The same random Llama at two depths (2 and 4 blocks), saved once."""
    root = tmp_path_factory.mktemp("llamas")
    return {n: _llama(root / f"l{n}", n) for n in (2, 4)}


@pytest.mark.parametrize("n_layers, weights", [(2, "disk"), (4, "disk"), (4, "memory")])
def test_predicted_peak_is_within_a_quarter_of_the_measured_one(llamas, tmp_path, n_layers,
                                                               weights):
    folder = llamas[n_layers]
    mem = _measured_scan(folder, weights, tmp_path / "out")
    assert mem["mode"] == weights and mem["host_peak_source"] == "VmHWM"
    measured = mem["host_peak_bytes"] - mem["baseline_bytes"]
    predicted = mem["predicted_peak_bytes"] - mem["baseline_bytes"]
    assert measured > 150e6, mem            # the weights dominate what is compared
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured, mem)
    summary = json.loads((tmp_path / "out" / "manifest.json").read_text())["memory"]
    assert summary["host_peak_bytes"] == mem["host_peak_bytes"]


def _huge(folder: Path) -> str:
    """A config whose one block is ~30 GB in float32 (d = 16384, ffn = 131072), a tokenizer
    and a small real safetensors file: the plan reads only these, never a weight."""
    cfg = small_config("llama", n_layers=2, d=16384, heads=128, vocab=32000, ffn=131072,
                       max_pos=256)
    cfg.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(folder)
    save_file({"lm_head.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    return str(folder)


def test_a_block_too_big_for_this_machine_is_one_line_before_anything_is_written(tmp_path):
    folder = _huge(tmp_path / "huge")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "coupling.cli", "scan", "--model", folder,
                           "--max-prompts", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "in disk mode but only" in err[0], err
    assert "the block being worked on:" in err[0] and "GB" in err[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_dry_run_without_ray_prints_the_plan_and_writes_nothing(llamas, tmp_path):
    folder = llamas[2]
    proc = subprocess.run([sys.executable, "-m", "coupling.cli", "scan", "--model", folder,
                           "--max-prompts", "1", "--out", str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "weights    memory: the whole model in memory" in proc.stdout
    assert "predicted host peak" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_auto_picks_disk_when_the_whole_model_does_not_fit():
    sizes = param_counts(load_config(str(TINY_MODEL_DIR)), TINY_MODEL_DIR)
    s = ScanSettings(k=4)
    whole = plan(sizes, "float32", s, 16, available=10**12, baseline=0)
    assert whole.mode == "memory" and whole.parts["weights"] > 0
    small = int(whole.predicted_bytes * 0.9)     # room for one block, not for all of them
    disk = plan(sizes, "float32", s, 16, available=small, baseline=0)
    assert disk.mode == "disk" and "does not fit" in disk.reason
    assert disk.predicted_bytes < whole.predicted_bytes
    with pytest.raises(MemoryPlanError, match="use a bigger machine|--weights disk"):
        plan(sizes, "float32", s, 16, weights="memory", available=small, baseline=0)
    with pytest.raises(MemoryPlanError, match="local safetensors"):
        plan(sizes, "float32", s, 16, weights="disk", disk_ok=False)


def test_a_gpu_scan_is_planned_against_the_gpus_free_memory():
    """On a GPU the weights, the block and the work are the device's; the host keeps only
    the file pages being copied.  ``auto`` compares the device's free memory (given here:
    no GPU is needed to plan one)."""
    sizes = param_counts(load_config(str(TINY_MODEL_DIR)), TINY_MODEL_DIR)
    s = ScanSettings(k=4)
    cpu = plan(sizes, "float32", s, 16, available=10**12, baseline=0)
    whole = plan(sizes, "float32", s, 16, available=10**12, baseline=0, device="cuda",
                 device_available=10**12)
    assert whole.mode == "memory" and whole.device_peak_bytes == cpu.predicted_bytes
    assert whole.parts["weights"] == 0 and whole.predicted_bytes < cpu.predicted_bytes
    small = int(whole.device_peak_bytes * 0.9)
    disk = plan(sizes, "float32", s, 16, available=10**12, baseline=0, device="cuda:1",
                device_available=small)
    assert disk.mode == "disk" and "available on cuda:1" in disk.reason
    assert disk.device_peak_bytes < whole.device_peak_bytes
    assert any("device     cuda:1: predicted peak" in line for line in disk.lines())
    assert disk.to_dict()["predicted_device_peak_bytes"] == disk.device_peak_bytes
    with pytest.raises(MemoryPlanError, match="cuda:1's memory in disk mode .* one block"):
        plan(sizes, "float32", s, 16, available=10**12, baseline=0, device="cuda:1",
             device_available=disk.device_peak_bytes // 4)


def test_a_device_this_torch_cannot_use_is_one_line_before_anything_is_written(tmp_path):
    from coupling.scan import ScanConfig, scan

    with pytest.raises(ValueError, match="--device 'tpu': use cpu, cuda or cuda:N"):
        ScanConfig(device="tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-CUDA error cannot happen here")
    with pytest.raises(ValueError, match="sees no CUDA GPU: .* or scan with --device cpu"):
        scan(device="cuda", max_prompts=1, out=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_ray_config_refuses_the_local_only_settings():
    from ray_jobs.config import parse_config

    with pytest.raises(ValueError, match="device: cuda is a setting of the local scan"):
        parse_config({"model": str(TINY_MODEL_DIR), "device": "cuda"})
    with pytest.raises(ValueError, match="weights: disk is a setting of the local scan.*stages"):
        parse_config({"model": str(TINY_MODEL_DIR), "weights": "disk"})
