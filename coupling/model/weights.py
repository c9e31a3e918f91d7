"""Models without weights, and only the weights a block range owns (or one block at a time).

A block range (``coupling.model.block_range``: a stage of a pipelined Ray placement, or the
local scan reading one block at a time) holds blocks ``[lo, hi)`` plus, on the first range,
everything the model runs before its blocks (token/position embeddings) and, on the last,
the final norm and the unembedding.  Nothing else is ever read from disk:

1. ``build_skeleton(config)`` builds the architecture under
   ``accelerate.init_empty_weights(include_buffers=False)``: parameters on the ``meta`` device
   (no memory), buffers real, because non-persistent buffers such as rotary ``inv_freq`` are
   computed at construction and are not stored in checkpoints.
2. ``model_layout(skeleton)`` sorts every parameter name into blocks / embedding / final norm /
   head and knows each one's size, which is what placement balances on.
3. ``materialize(skeleton, names, weights)`` reads exactly those tensors with
   ``safetensors.safe_open`` (one ``get_tensor`` per owned key) and puts them in place;
   ``release(skeleton, names)`` puts them back on ``meta`` (a block dropped after its turn).
   From a GGUF file the same two calls read and dequantize only those tensors
   (``coupling.model.gguf.GgufTensors``, which ``locate_weights`` returns for a GGUF source).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from coupling.model.blocks import find_blocks, find_final_norm
from coupling.model.gguf import GgufTensors, find_gguf
# the Auto-class choice must match load_model's
from coupling.model.loading import _model_class, parse_dtype

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
INDEX_FILE = "model.safetensors.index.json"


class WeightsError(ValueError):
    """Weights missing or not readable part by part; the message says what to do."""


# ------------------------------------------------------------------------------------------
# Skeleton and layout
# ------------------------------------------------------------------------------------------
def build_skeleton(config, dtype="float32", trust_remote_code: bool = False) -> nn.Module:
    """The model for ``config`` with every parameter on ``meta`` (buffers real), eval, frozen."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = _model_class(config).from_config(config, attn_implementation="eager",
                                                 dtype=parse_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied head and embedding count once, as in a loaded model
    return model.eval().requires_grad_(False)


@dataclass
class ModelLayout:
    """Parameter names of a model sorted by the part that owns them."""

    block_path: str
    blocks: list            # blocks[i]: parameter names of block i (0-based)
    embedding: list         # run before the blocks (first stage)
    final_norm: list        # after the blocks (last stage)
    head: list              # unembedding (last stage)
    numel: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def stage_names(self, lo: int, hi: int) -> list:
        """Names a stage owning blocks ``[lo, hi)`` (0-based) must materialise."""
        names = [n for i in range(lo, hi) for n in self.blocks[i]]
        if lo == 0:
            names = self.embedding + names
        if hi == self.n_layers:
            names = names + self.final_norm + self.head
        return names

    def count(self, names) -> int:
        return sum(self.numel[n] for n in names)

    def block_counts(self) -> list:
        return [self.count(b) for b in self.blocks]


def model_layout(model: nn.Module, block_path: str | None = None,
                 n_layers: int | None = None) -> ModelLayout:
    path, blocks = find_blocks(model, block_path, n_layers)
    names_of = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    norm = find_final_norm(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm_prefix = names_of.get(id(norm)) if norm is not None else None
    head_prefix = names_of.get(id(head)) if head is not None else None
    per_block = [[] for _ in blocks]
    embedding, final_norm, head_names, numel = [], [], [], {}
    for name, p in model.named_parameters(remove_duplicate=False):
        numel[name] = p.numel()
        if name.startswith(path + "."):
            per_block[int(name[len(path) + 1:].split(".")[0])].append(name)
        elif norm_prefix and name.startswith(norm_prefix + "."):
            final_norm.append(name)
        elif head_prefix and name.startswith(head_prefix + "."):
            head_names.append(name)
        else:
            embedding.append(name)
    return ModelLayout(path, per_block, embedding, final_norm, head_names, numel)


# ------------------------------------------------------------------------------------------
# Where each tensor lives on disk
# ------------------------------------------------------------------------------------------
def weight_files(model_dir) -> dict:
    """``{checkpoint key: safetensors file}`` from the index (sharded) or the single file."""
    folder = Path(model_dir)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{folder} holds no .safetensors weights: block-range placement reads weights part "
            "by part and needs safetensors (re-save with save_pretrained(safe_serialization=True))")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def locate_weights(model: nn.Module, source, names, revision=None) -> dict | GgufTensors:
    """``{checkpoint key: local file}`` covering the parameters ``names``.

    A local folder is used as is.  A hub id downloads the shard index (or the single
    ``model.safetensors``) and then only the shard files holding the owned keys, so a stage
    of a 70B model fetches its own ~1/S of the weights.  A GGUF file (or a folder holding
    one) gives its ``GgufTensors``: the file parsed once, each tensor read when asked for.
    """
    gguf = find_gguf(source)
    if gguf is not None:
        return GgufTensors(gguf, model)
    if Path(str(source)).is_dir():
        return weight_files(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def get(name):
        return Path(hf_hub_download(str(source), name, revision=revision))

    try:
        index = get(INDEX_FILE)
    except EntryNotFoundError:
        single = get("model.safetensors")
        return weight_files(single.parent) if single.exists() else {}
    except Exception as e:  # offline, unknown repo, gated...
        raise WeightsError(f"cannot fetch the weights of {source!r}: {str(e).splitlines()[0]}")
    weight_map = json.loads(index.read_text())["weight_map"]
    keys = {checkpoint_key(model, n, weight_map) for n in names}
    files = {f: get(f) for f in sorted({weight_map[k] for k in keys})}
    return {k: files[f] for k, f in weight_map.items() if f in files}


def checkpoint_key(model: nn.Module, name: str, available) -> str:
    """The checkpoint key holding parameter ``name``: itself, its tied source, or the name
    with/without the base-model prefix (checkpoints saved from the bare base model)."""
    candidates = [name]
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and name in tied:
        candidates.append(tied[name])
    prefix = getattr(model, "base_model_prefix", "") or ""
    for c in list(candidates):
        if prefix and c.startswith(prefix + "."):
            candidates.append(c[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{c}")
    for c in candidates:
        if c in available:
            return c
    raise WeightsError(f"parameter {name!r} is not in the checkpoint's safetensors files "
                       f"(tried {candidates}): is the folder complete and of this architecture?")


def materialize(model: nn.Module, names, files: dict, dtype="float32",
                device: str | torch.device = "cpu", upcast: torch.dtype | None = None) -> int:
    """Load exactly the parameters ``names`` from safetensors into ``model`` (in place).

    ``files``: ``{checkpoint key: file}`` (``weight_files``).  Parameters reading the same key
    (tied embeddings held by one stage) share one tensor.  ``upcast``: then converted to this
    (compute) dtype, tensor by tensor -- the values of the ``dtype`` model, in more bits.
    Returns the bytes read.  ``files`` may be a GGUF file's ``GgufTensors``: then only the
    tensors of ``names`` are read and dequantized, and the bytes read are as stored.
    """
    from safetensors import safe_open

    torch_dtype = parse_dtype(dtype)
    if isinstance(files, GgufTensors):
        return _materialize_gguf(model, names, files, torch_dtype, device, upcast)
    by_file: dict = {}
    for name in names:
        key = checkpoint_key(model, name, files)
        by_file.setdefault(files[key], []).append((name, key))
    loaded, n_bytes = {}, 0
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name, key in pairs:
                if key not in loaded:
                    t = fh.get_tensor(key)
                    n_bytes += t.numel() * t.element_size()
                    if t.is_floating_point():
                        t = t.to(torch_dtype).to(upcast or torch_dtype)
                    loaded[key] = nn.Parameter(t.to(device), requires_grad=False)
                _set_parameter(model, name, loaded[key])
    return n_bytes


def _materialize_gguf(model, names, tensors: GgufTensors, dtype, device, upcast) -> int:
    read, n_bytes = tensors.read(names, dtype)
    params: dict = {}                # a tied head and embedding: one tensor, one Parameter
    for name, t in read.items():
        if id(t) not in params:
            params[id(t)] = nn.Parameter(t.to(upcast or dtype).to(device), requires_grad=False)
        _set_parameter(model, name, params[id(t)])
    return n_bytes


def release(model: nn.Module, names):
    """Put the parameters ``names`` back on ``meta``: their memory goes once nothing else holds
    them (a block read by :func:`materialize` for a while, then dropped)."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        p = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                requires_grad=False)


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter):
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    expected = tuple(module._parameters[attr].shape)
    if tuple(param.shape) != expected:
        raise WeightsError(f"checkpoint tensor for {name!r} has shape {tuple(param.shape)}, the "
                           f"config says {expected}: the config and weights do not match")
    module._parameters[attr] = param


def materialized_numel(model: nn.Module) -> int:
    """Parameters actually held in memory (not on ``meta``), each shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


def dtype_bytes(dtype) -> int:
    return DTYPE_BYTES[parse_dtype(dtype)]
