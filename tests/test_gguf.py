"""GGUF files as models: a file, a folder holding one, YAML, the Python API, checkpoints,
perturb, Ray replicas and block-range stages, and the bad inputs (one line, nothing written).

The files are real GGUF written by the ``gguf`` package (``gguf_files.write_llama_gguf``: a
random-init Llama in llama.cpp's layout with the embedded tiny model's tokenizer); the bad
ones are made from the real SmolLM2 file (truncated, magic bytes flipped) or written for an
architecture transformers does not read.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from gguf_files import gguf_folder, smollm2_gguf, write_llama_gguf
from ray_fixtures import *  # noqa: F401,F403  (session fixtures)
from ray_fixtures import assert_same_as_local, ray_config

from coupling.cli import add_checkpoints_parser, add_perturb_parser
from coupling.cli import main as coupling_main
from coupling.experiments.checkpoint_spec import parse_spec
from coupling.model.gguf import GgufError, GgufTensors, find_gguf
from coupling.model.loading import TINY_MODEL_DIR, load_model
from coupling.scan import scan

SCAN = dict(prompts="builtin", max_prompts=3, max_tokens=10, k=4, figures=False,
            measures="depth,regularity")


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """``(folder, file, model)``: a 3-block Llama stored as F32 (the file is the model)."""
    return gguf_folder(tmp_path_factory.mktemp("f32"), n_layers=3, seed=1)


@pytest.fixture(scope="module")
def local_gguf_scan(f32, tmp_path_factory):
    return scan(str(f32[1]), out=str(tmp_path_factory.mktemp("gguf-ref") / "local"),
                progress=False, **SCAN)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_file_and_its_folder_load_the_model_it_holds(f32):
    folder, path, written = f32
    for source in (path, folder, str(path)):
        lm = load_model(source)
        _same_weights(lm.model, written)
        g = lm.info["gguf"]
        assert lm.info["format"] == "gguf" and g["file"] == path.name
        assert g["architecture"] == "llama" and g["tensor_types"] == {"F32": 3 * 9 + 2}
        assert lm.info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (lm.info["n_layers"], lm.info["d_model"]) == (3, 32)
    # the tokenizer is the file's: the embedded tiny model's vocabulary and merges
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    text = "The capital of France is Paris, 1234 times!"
    assert lm.tokenizer(text).input_ids == ref(text).input_ids


def test_q8_0_weights_are_the_files_blocks_dequantized(tmp_path):
    """Q8_0 block = fp16 scale d + 32 int8 q; weight = d * q.  Decoded here from the raw
    bytes and compared with what load_model holds (ffn_down: no row permutation)."""
    import gguf
    _, path, _ = gguf_folder(tmp_path, quant="Q8_0", seed=2)
    lm = load_model(path)
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down.weight")
    blocks = np.asarray(t.data).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    expect = (d * q).reshape(lm.model.model.layers[1].mlp.down_proj.weight.shape)
    assert lm.info["gguf"]["tensor_types"] == {"F32": 2 * 2 + 1, "Q8_0": 2 * 7 + 1}
    assert torch.equal(lm.model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(expect))


def test_random_init_keeps_the_files_config_and_tokenizer(f32):
    lm = load_model(f32[1], random_init=True, seed=4)
    assert lm.info["random_init"] and lm.info["gguf"]["architecture"] == "llama"
    assert not torch.equal(lm.model.model.layers[0].mlp.up_proj.weight,
                           f32[2].model.layers[0].mlp.up_proj.weight)
    assert lm.tokenizer is not None and lm.config.num_hidden_layers == 3


def test_scan_cli_and_yaml_of_a_gguf_file(f32, local_gguf_scan, tmp_path):
    out = tmp_path / "cli"
    argv = ["scan", "--model", str(f32[1]), "--out", str(out), "--prompts", "builtin",
            "--max-prompts", "3", "--max-tokens", "10", "--k", "4",
            "--measures", "depth,regularity", "--no-figures"]
    assert coupling_main(argv) == 0
    assert_same_as_local(out, local_gguf_scan)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["gguf"]["file"] == "tiny.gguf"
    assert manifest["jacobians"]["line"] == "one-token on 3/3 layers"
    cfg = tmp_path / "scan.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(f32[0]), **SCAN, "measures": SCAN["measures"]}))
    assert coupling_main(["scan", "--config", str(cfg), "--out", str(tmp_path / "yaml"),
                          "--no-figures"]) == 0
    assert_same_as_local(tmp_path / "yaml", local_gguf_scan)


def test_stage_tensors_are_only_its_blocks_and_equal_the_full_load(f32):
    from coupling.model.weights import build_skeleton
    folder, path, written = f32
    full = dict(written.named_parameters(remove_duplicate=False))
    skeleton = build_skeleton(load_model(path).config)
    file_tensors = GgufTensors(find_gguf(path), skeleton)
    names = [n for n in full if n.startswith("model.layers.1.")]
    tensors, n_bytes = file_tensors.read(names)
    assert sorted(tensors) == sorted(names)
    assert n_bytes == 4 * sum(full[n].numel() for n in names)      # F32: 4 bytes a weight
    for n in names:
        assert torch.equal(tensors[n], full[n]), n
    head, _ = file_tensors.read(["lm_head.weight", "model.norm.weight"])
    assert torch.equal(head["lm_head.weight"], full["model.embed_tokens.weight"])   # tied


def test_a_gguf_file_streamed_block_by_block_gives_the_loaded_models_numbers(f32):
    """The local scan of a model larger than memory reads each block's tensors from the GGUF
    file for its turn (StreamedModel): the numbers of the model loaded whole."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.model.block_range import StreamedModel
    from coupling.settings.scan_settings import ScanSettings
    lm, streamed = load_model(f32[1]), StreamedModel(f32[1])
    assert streamed.info["gguf"] == lm.info["gguf"]
    ids = lm.tokenizer("The capital of France is Paris", return_tensors="pt").input_ids
    settings = ScanSettings(k=4, measures=("depth", "regularity"))
    a, b = analyze_prompt(lm, ids, settings), analyze_prompt(streamed, ids, settings)
    np.testing.assert_array_equal(b.depth_normalized, a.depth_normalized)
    np.testing.assert_array_equal(b.layers["norm"], a.layers["norm"])
    assert all(p.device.type == "meta" for p in streamed.blocks.blocks.parameters())


@pytest.mark.parametrize("placement", ["replicas", "stages"])
def test_ray_scan_of_a_gguf_file_equals_the_local_scan(ray_address, f32, local_gguf_scan,
                                                       tmp_path, placement):
    from ray_jobs.config import parse_config
    from ray_jobs.scan import run_scan

    extra = {"stages": 2} if placement == "stages" else {"replicas": 1}
    cfg = parse_config({**ray_config(f32[1], placement=placement, **extra), **SCAN},
                       out=str(tmp_path / placement))
    report = run_scan(cfg, progress=False)
    key = cfg.jobs[0].key
    rep = report["models"][key]
    assert rep["placement"]["kind"] == placement
    if placement == "stages":
        assert [tuple(r) for r in rep["placement"]["ranges"]] in ([(0, 1), (1, 3)],
                                                                   [(0, 2), (2, 3)])
        whole = sum(p.numel() for p in f32[2].parameters())
        assert sum(a["n_params"] for a in rep["actors"]) < 2 * whole
    assert key.startswith("tiny.gguf-")
    assert_same_as_local(tmp_path / placement / key, local_gguf_scan)


def test_checkpoints_and_perturb_take_gguf_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for step, seed in ((0, 0), (10, 1)):
        write_llama_gguf(run / f"step-{step}.gguf", seed=seed)
    spec = {"name": "gguf-run", "checkpoints": [str(run / "step-*.gguf")],
            "scan": {"prompts": "builtin", "max_prompts": 2, "max_tokens": 8, "k": 4}}
    assert [(c.step, c.label) for c in parse_spec(spec)[1]] == [(0, "step-0"), (10, "step-10")]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_checkpoints_parser(sub)
    add_perturb_parser(sub)
    args = parser.parse_args(["checkpoints", str(tmp_path / "spec.yaml"),
                              "--out", str(tmp_path / "ck"), "--quiet"])
    assert args.func(args) == 0
    table = pd.read_parquet(tmp_path / "ck" / "dynamics.parquet")
    assert list(table.step) == [0, 10]
    args = parser.parse_args(["perturb", "--model", str(run / "step-10.gguf"), "--levels",
                              "0.1,1", "--samples", "2", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert len(pd.read_csv(tmp_path / "p" / "perturbation.csv")) == 2 * 3


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written
# ------------------------------------------------------------------------------------------
def _one_line_error(argv, capsys, out) -> str:
    assert coupling_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert not out.exists()
    return err[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Made from the real SmolLM2 file: cut 1 kB short, and with its magic bytes flipped."""
    root = tmp_path_factory.mktemp("bad")
    data = smollm2_gguf().read_bytes()
    (root / "truncated.gguf").write_bytes(data[:-1024])
    (root / "magic.gguf").write_bytes(b"FUGG" + data[4:])
    write_llama_gguf(root / "bert.gguf", arch="bert")
    return root


@pytest.mark.parametrize("name, says", [
    ("truncated.gguf", "is not a readable GGUF file"),
    ("magic.gguf", "is not a readable GGUF file"),
    ("bert.gguf", "cannot dequantize GGUF architecture 'bert'"),
])
def test_bad_gguf_files_fail_in_one_line_naming_the_file(bad_files, tmp_path, capsys, name,
                                                         says):
    out = tmp_path / "out"
    line = _one_line_error(["scan", "--model", str(bad_files / name), "--out", str(out),
                            "--no-figures"], capsys, out)
    assert str(bad_files / name) in line and says in line, line
    if name != "truncated.gguf":     # (the same check; parsing 98 MB to its cut costs ~5 s)
        with pytest.raises(GgufError, match=says):
            load_model(bad_files / name)


def test_a_folder_with_two_gguf_files_asks_for_one(f32, tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(f32[1], folder / "a.gguf")
    shutil.copy(f32[1], folder / "b.gguf")
    out = tmp_path / "out"
    line = _one_line_error(["scan", "--model", str(folder), "--out", str(out)], capsys, out)
    assert f"folder {folder} holds 2 .gguf files (a.gguf, b.gguf)" in line
    assert "--model FOLDER/FILE.gguf" in line
    assert find_gguf(folder / "a.gguf").name == "a.gguf"
    with pytest.raises(GgufError, match="does not exist"):
        find_gguf(tmp_path / "missing.gguf")


def test_a_bitsandbytes_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """4-bit bitsandbytes weights cannot be differentiated with torch.func (docs/methods.md):
    refused before transformers asks for a GPU library, nothing written."""
    from coupling.model.zoo import save_random
    folder = tmp_path / "bnb"
    save_random("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()                       # (save_pretrained's progress bar)
    out = tmp_path / "out"
    line = _one_line_error(["scan", "--model", str(folder), "--out", str(out)], capsys, out)
    assert f"{folder} is a bitsandbytes-quantized checkpoint" in line
    assert "model.dequantize()" in line
