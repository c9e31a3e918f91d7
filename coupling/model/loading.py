"""Load a Hugging Face transformer (hub id, local folder, revision, GGUF file) ready for
Jacobians.

A GGUF file (``FILE.gguf``, or a folder holding exactly one) is read by transformers from its
folder with ``gguf_file=NAME`` and dequantized (``coupling.model.gguf``).

Jacobians need ``attn_implementation="eager"``: forward-mode AD is not implemented through
fused SDPA attention kernels.  Parameters are frozen (we differentiate with respect to hidden
states only, which keeps autograd from storing weight gradients).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coupling.errors import ModelLoadError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Packaged default: the project's own tiny GPT trained by scripts/train_tiny.py.
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    config: object
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16") from None


def _model_class(config):
    """Pick the Auto class that keeps the model's head (logit lens needs the unembedding)."""
    import transformers as tf

    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return tf.AutoModelForCausalLM
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return tf.AutoModelForMaskedLM
    if "ForImageClassification" in archs:   # a ViT classifier: keep its head's weights
        return tf.AutoModelForImageClassification
    if not archs and type(config) in tf.AutoModelForCausalLM._model_mapping:
        return tf.AutoModelForCausalLM
    return tf.AutoModel


def load_model(model: str | os.PathLike | None = None, *, revision: str | None = None,
               dtype="float32", attn_implementation: str = "eager",
               trust_remote_code: bool = False, random_init: bool = False, seed: int = 0,
               device: str | None = None, device_map=None) -> LoadedModel:
    """Load model + tokenizer from a hub id, a ``save_pretrained`` folder or a GGUF file
    (``FILE.gguf``, or a folder holding exactly one; config and tokenizer from the file).

    ``model=None`` loads the embedded tiny model.  ``revision`` (a hub branch, tag or
    commit) only goes with a hub id: with a local folder or file it is an error.
    ``random_init=True`` keeps the config (architecture, sizes) and draws fresh weights with
    ``torch.manual_seed(seed)``, for trained-vs-untrained comparisons.
    """
    source = str(model) if model is not None else str(TINY_MODEL_DIR)
    torch_dtype = parse_dtype(dtype)
    with model_files(source, revision, trust_remote_code) as (where, common, gguf):
        config = load_config(source, revision, trust_remote_code)
        cls = _model_class(config)
        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
        if random_init:
            torch.manual_seed(seed)
            net = cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        else:
            net = _from_pretrained(cls, where, revision, device_map, common, kwargs, gguf)
        tokenizer = gguf.tokenizer() if gguf is not None else _load_tokenizer(where, common)
    if device is not None and device_map is None:
        net = net.to(device)
    net.eval()
    net.requires_grad_(False)
    info = model_info(source, source if model is not None else "embedded:tiny", config, net,
                      torch_dtype, revision, random_init, seed)
    info.update(gguf.manifest() if gguf is not None else {})
    return LoadedModel(net, tokenizer, config, info)


@contextlib.contextmanager
def model_files(source: str, revision=None, trust_remote_code: bool = False):
    """``(where, common, gguf)`` for the ``from_pretrained`` calls that load ``source``
    within the block: the folder or hub id, the keywords every call takes, and the checked
    GGUF file (``coupling.model.gguf.OpenGguf``, parsed once for the whole block) or None."""
    # imported here: GGUF support (the gguf package) is loaded only for GGUF files
    from coupling.model.gguf import find_gguf, open_gguf

    gf = find_gguf(source)
    _refuse_local_revision(source, revision, gf is not None)
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    if gf is None:
        yield source, common, None
        return
    with open_gguf(gf) as gguf:
        yield gf.folder, {**common, **gguf.kwargs}, gguf


def load_config(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config alone (no weights), failures as one-line ``ModelLoadError``; a
    GGUF file's from its metadata."""
    import transformers as tf

    with model_files(source, revision, trust_remote_code) as (where, common, gguf):
        try:
            config = tf.AutoConfig.from_pretrained(where, **common)
        except (OSError, ValueError) as e:
            if gguf is not None:
                raise gguf.load_error(e) from None
            raise ModelLoadError(_load_hint(source, revision, e)) from None
    _refuse_bitsandbytes(config, source)
    return config


def _refuse_bitsandbytes(config, source: str):
    """A bitsandbytes 4/8-bit checkpoint: its matmuls are autograd Functions that torch.func's
    vjp cannot pass through (docs/methods.md, "Quantized models"), so refuse it up front."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else \
        getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) == "bitsandbytes":
        raise ModelLoadError(f"{source} is a bitsandbytes-quantized checkpoint, which the scan "
                             "cannot differentiate through: load it with transformers, call "
                             "model.dequantize(), save_pretrained the float model and scan that "
                             "folder (docs/methods.md, 'Quantized models')")


def _refuse_local_revision(source: str, revision, is_gguf: bool):
    is_folder = Path(source).expanduser().is_dir()
    if revision is not None and (is_gguf or is_folder):
        # transformers loads a folder as it is and ignores the revision: refuse, rather than
        # record a revision the weights do not come from
        what = "folder" if is_folder else "file"
        raise ModelLoadError(f"revision {revision!r} was given with the local {what} {source}, "
                             "which has no revisions: drop the revision, or pass a hub id")


def model_info(source: str, model_id: str, config, net, torch_dtype, revision=None,
               random_init: bool = False, seed: int = 0) -> dict:
    """``LoadedModel.info``: what the manifest records about the model (``net`` may be a
    weightless skeleton: only its structure and parameter counts are read)."""
    return dict(id=model_id, path=source,
                revision=revision or getattr(config, "_commit_hash", None),
                dtype=str(torch_dtype).removeprefix("torch."), random_init=random_init,
                seed=seed if random_init else None, model_type=config.model_type,
                architecture=type(net).__name__,
                n_params=sum(p.numel() for p in net.parameters()),
                n_layers=_num_layers(config), d_model=_hidden_size(config),
                weights_sha256=_weights_hash(source))


def _from_pretrained(cls, source, revision, device_map, common, kwargs, gguf=None):
    """``cls.from_pretrained`` with its failures turned into one-line errors naming the file:
    a truncated or corrupted weight file, and weights that do not fit the config (which
    transformers would otherwise fill with fresh random values, a silently wrong model).
    A GGUF file is dequantized (``coupling.model.gguf.dequantized_kwargs``)."""
    from safetensors import SafetensorError

    from coupling.model.gguf import dequantized_kwargs

    extra = dequantized_kwargs() if gguf is not None else {}
    try:
        net, report = cls.from_pretrained(source, device_map=device_map, output_loading_info=True,
                                          **common, **kwargs, **extra)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if gguf is not None:
            raise gguf.load_error(e) from None
        bad = _unreadable_weight_file(source)
        if bad is not None:
            raise ModelLoadError(f"weight file {bad[0]} is unreadable ({bad[1]}): it is truncated "
                                 "or corrupted; copy or save the model again") from None
        if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
            raise ModelLoadError(f"the weights in {source} do not fit its config.json (tensor "
                                 "shapes differ): use the config the weights were saved with"
                                 ) from None
        raise ModelLoadError(_load_hint(source, revision, e)) from None
    missing = [k for k in report.get("missing_keys", ()) if k]
    mismatched = report.get("mismatched_keys", ())
    if missing or mismatched:
        keys = list(missing) + [m[0] if isinstance(m, (tuple, list)) else m for m in mismatched]
        raise ModelLoadError(
            f"the weights in {source} do not fit its config.json: {len(keys)} tensor(s) "
            f"missing or of another shape (e.g. {sorted(keys)[0]}); they would be random. "
            "Use the config the weights were saved with")
    return net


def _unreadable_weight_file(source) -> tuple[str, str] | None:
    """``(path, error)`` of the first local weight file whose safetensors header can't be read."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    if not folder.is_dir():
        return None
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():   # reading each tensor catches a truncated body too
                    fh.get_slice(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            return str(f), first_line(e)
    return None


def _load_tokenizer(source, common):
    import transformers as tf

    for loader in (tf.AutoTokenizer, tf.AutoImageProcessor):
        try:
            return loader.from_pretrained(source, **common)
        except (OSError, ValueError, TypeError, KeyError, ImportError):   # 5.17: no torchvision
            continue
    return None


def _load_hint(source, revision, err) -> str:
    where = f" at revision {revision!r}" if revision else ""
    # hub ids look like "name" or "org/name"; anything else is meant as a folder
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path and not Path(source).expanduser().exists():
        return f"model folder {source!r} does not exist: pass a save_pretrained folder or a hub id"
    return (f"could not load model {source!r}{where}: {first_line(err)} "
            "(check the id/path; offline machines need a local save_pretrained folder)")


def _num_layers(config) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _hidden_size(config) -> int | None:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _weights_hash(source: str, limit_bytes: int = 2 << 30) -> str | None:
    """sha256 over a local folder's weight files (skipped above ``limit_bytes``)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files or sum(f.stat().st_size for f in files) > limit_bytes:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
