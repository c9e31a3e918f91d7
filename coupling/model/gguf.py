"""GGUF model files (the format of llama.cpp, Ollama, LM Studio) as scan inputs.

A ``.gguf`` file holds one model's config, tokenizer and (mostly quantized) weights.
transformers reads it with the ``gguf`` package: ``from_pretrained(folder, gguf_file=NAME)``
builds the config and the tokenizer from the file's metadata and **dequantizes** every tensor
to float at load time, so the network the scan differentiates is the ordinary float network
whose weights are the file's quantized values (docs/methods.md, "GGUF files").

Here: which file a model source names (``FILE.gguf``, or a folder holding exactly one
``.gguf`` and no ``config.json``); the file checked before anything is built (truncated or
corrupted, or an architecture transformers cannot dequantize: one line naming the file); its
manifest facts (sha256, architecture, tensor types); and ``GgufTensors``, the tensors of
chosen parameters only, dequantized one by one exactly as transformers does, for a
block-range stage or a scan that holds a few blocks of a model at a time.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from coupling.errors import ModelLoadError, first_line

SUFFIX = ".gguf"


class GgufError(ModelLoadError):
    """A GGUF file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class GgufFile:
    path: Path

    @property
    def folder(self) -> str:
        return str(self.path.parent)

    @property
    def name(self) -> str:
        return self.path.name


def is_gguf_file(path) -> bool:
    """An existing file named ``*.gguf``."""
    path = Path(str(path)).expanduser()
    return path.suffix.lower() == SUFFIX and path.is_file()


def find_gguf(source) -> GgufFile | None:
    """The GGUF file ``source`` names, or None when it names something else (a hub id, a
    ``save_pretrained`` folder).  A folder counts when it holds ``.gguf`` files and no
    ``config.json``; with more than one the choice is the user's."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise GgufError(f"GGUF file {source} does not exist: pass the path of a .gguf file")
        return GgufFile(path)
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if is_gguf_file(p))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise GgufError(f"folder {source} holds {len(found)} .gguf files ({names}): pass one "
                        "of them as the model (--model FOLDER/FILE.gguf)")
    return GgufFile(found[0]) if found else None


def read_gguf(gf: GgufFile):
    """The file's ``gguf.GGUFReader``: metadata parsed, every tensor laid over the memory-mapped
    file (nothing read yet), so a truncated file fails here, as does one that is not GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GgufError(f"reading {gf.path} needs the gguf package: pip install -e "
                        "'.[gguf]' (or pip install 'gguf>=0.17.1,<0.20')") from None
    try:
        return GGUFReader(str(gf.path))
    except Exception as e:   # noqa: BLE001 - any failure to parse the bytes means the same
        raise GgufError(f"{gf.path} is not a readable GGUF file ({first_line(e)}): it is "
                        "truncated or corrupted; copy or download it again") from None


@dataclass
class OpenGguf:
    """A checked GGUF file and its parsed reader, for one load."""

    file: GgufFile
    reader: object

    @property
    def kwargs(self) -> dict:
        """What ``from_pretrained(self.file.folder, **kwargs)`` needs to read this file."""
        return {"gguf_file": self.file.name}

    @property
    def architecture(self) -> str:
        field = self.reader.fields.get("general.architecture")
        return "unknown" if field is None else bytes(field.parts[field.data[0]]).decode()

    def manifest(self) -> dict:
        """The manifest's facts (``model`` section): sha256, architecture, tensor types."""
        counts = Counter(t.tensor_type.name for t in self.reader.tensors)
        digest = sha256(self.file.path)
        return {"format": "gguf", "weights_sha256": digest,
                "gguf": {"file": self.file.name, "sha256": digest,
                         "architecture": self.architecture, "n_tensors": len(self.reader.tensors),
                         "tensor_types": dict(sorted(counts.items()))}}

    def load_error(self, err: BaseException) -> GgufError:
        """The one-line error for a failure of transformers on this file."""
        import transformers as tf

        text = first_line(err)
        if "not supported" in text or "Unknown gguf model_type" in text:
            return GgufError(f"{self.file.path}: transformers {tf.__version__} cannot dequantize "
                             f"GGUF architecture {self.architecture!r} ({text}); use a "
                             "save_pretrained folder of the model instead")
        return GgufError(f"could not load GGUF file {self.file.path}: {text}")

    def tokenizer(self):
        import transformers as tf

        try:
            return tf.AutoTokenizer.from_pretrained(self.file.folder, **self.kwargs)
        except Exception as e:   # noqa: BLE001 - any failure: the file's tokenizer is unusable
            raise GgufError(f"the tokenizer of GGUF file {self.file.path} cannot be built "
                            f"({first_line(e)}): transformers cannot convert it") from None


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dequantized_kwargs() -> dict:
    """``from_pretrained`` keywords that make transformers dequantize every tensor.

    Recent transformers can keep some architectures' weights packed in GGUF blocks behind a
    matmul kernel (``GgufConfig(dequantize=False)`` when the ``kernels`` package has one for
    the device): such a layer has no float weight to differentiate through."""
    import transformers as tf

    config_cls = getattr(tf, "GgufConfig", None)
    return {"quantization_config": config_cls(dequantize=True)} if config_cls else {}


_OPEN: dict = {}       # path -> OpenGguf, while an open_gguf block holds it


@contextlib.contextmanager
def open_gguf(gf: GgufFile):
    """The checked file (``OpenGguf``); within the block the ``gguf`` package parses it once
    and builds each tensor-name map once, however often transformers asks.  Re-entrant: an
    inner block on the same file shares the outer one's parse.

    Loading one file, transformers builds a ``GGUFReader`` for the config, another for the
    tokenizer and another for the weights (each parses every metadata value: ~5 s for a
    49k-token vocabulary), and ``get_gguf_hf_weights_map`` rebuilds the same
    ``TensorNameMap(arch, n_blocks)`` for each of a model's ~400 submodules (~9 s).  The
    reader is read-only (a read-only memory map and values parsed from it) and the map a pure
    function of its arguments, so both are shared instead of rebuilt."""
    import gguf

    path = str(gf.path)
    if path in _OPEN:
        yield _OPEN[path]
        return
    opened = OpenGguf(gf, read_gguf(gf))
    new_reader, new_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def shared_reader(p, mode="r"):
        key = str(p)
        return _OPEN[key].reader if key in _OPEN and mode == "r" else new_reader(p, mode)

    if not _OPEN:
        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(new_map)
    _OPEN[path] = opened
    try:
        yield opened
    finally:
        del _OPEN[path]
        if not _OPEN:
            gguf.GGUFReader, gguf.get_tensor_name_map = new_reader, new_map


class GgufTensors:
    """A GGUF file's tensors by the parameter names of ``model`` (a skeleton on ``meta`` is
    enough), read and dequantized on demand: :meth:`read` of the parameters of blocks
    ``[lo, hi)`` touches only GGUF's ``blk.lo.*`` ... ``blk.(hi-1).*`` (plus the embedding or
    the head when asked for them).  The file is parsed and its tensor names mapped once, so
    reading a model block by block costs one parse.

    The conversion is exactly transformers' per-tensor one (its tensor-name map and its
    architecture's ``TensorProcessor``, e.g. Llama's q/k un-permutation)."""

    def __init__(self, gf: GgufFile, model: torch.nn.Module):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.file, self.model = gf, model
        with open_gguf(gf) as opened:
            self.config = model.config.to_dict()
            self.processor = TENSOR_PROCESSORS.get(opened.architecture,
                                                   TensorProcessor)(config=self.config)
            try:
                self.to_hf = get_gguf_hf_weights_map(model, self.processor)
            except NotImplementedError as e:     # an architecture the gguf package cannot name
                raise opened.load_error(e) from None
        self.tensors = opened.reader.tensors
        self.present = {self.to_hf[t.name] for t in self.tensors if t.name in self.to_hf}

    def read(self, names, dtype=torch.float32) -> tuple[dict, int]:
        """``({name: float tensor}, bytes read)``; names that share a tensor (a tied head)
        get the same tensor object."""
        from gguf import dequantize

        keys = {name: self._key(name) for name in names}
        wanted = set(keys.values())
        blocks = {_block_of(g) for g, h in self.to_hf.items() if h in wanted} - {None}
        parsed = {"config": self.config, "tensors": {}}   # MoE processors merge experts here
        out, n_bytes = {}, 0
        for t in self.tensors:
            target, block = self.to_hf.get(t.name), _block_of(t.name)
            if (target is not None and target not in wanted) or (block is not None
                                                                    and block not in blocks):
                continue                                  # never read: not asked for
            n_bytes += int(t.n_bytes)
            result = self.processor.process(weights=dequantize(t.data, t.tensor_type),
                                            name=t.name, tensor_key_mapping=self.to_hf,
                                            parsed_parameters=parsed)
            hf = self.to_hf.get(result.name) if result.name is not None else None
            if hf in wanted:
                out[hf] = torch.from_numpy(result.weights.copy()).to(dtype)
        out.update({k: v.to(dtype) for k, v in parsed["tensors"].items() if k in wanted})
        missing = sorted(wanted - set(out))
        if missing:
            raise GgufError(f"{self.file.path} holds no tensor for {missing[0]} "
                            f"({len(missing)} missing): is it a file of this architecture?")
        return {name: out[key] for name, key in keys.items()}, n_bytes

    def _key(self, name: str) -> str:
        """The parameter whose tensor the file holds for ``name``: itself or its tied source."""
        if name in self.present:
            return name
        tied = getattr(self.model, "_tied_weights_keys", None)
        if isinstance(tied, dict) and tied.get(name) in self.present:
            return tied[name]
        raise GgufError(f"{self.file.path} holds no tensor for parameter {name!r} (nor for one "
                        "tied to it): is it a file of this model's architecture?")


def _block_of(gguf_name: str) -> int | None:
    """``N`` of GGUF's standard block tensor name ``blk.N.*``; None for the others."""
    parts = gguf_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None
