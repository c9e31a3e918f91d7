"""Load a DeepSpeed ZeRO-2/3 checkpoint directly: no conversion step for the user.

A ZeRO checkpoint directory (what ``engine.save_checkpoint(DIR)`` writes) holds one folder
per tag (``global_step100``...) with the parameters partitioned over the ranks, plus a
``latest`` file naming the newest tag::

    DIR/latest                                      "global_step100"
    DIR/global_step100/mp_rank_00_model_states.pt   (ZeRO-2) or zero_pp_rank_*_model_states.pt (ZeRO-3)
    DIR/global_step100/*_optim_states.pt            fp32 master weights, partitioned

DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` merges the
partitions into one fp32 state dict; we build the Hugging Face model from a config folder
(``config.json``, and a tokenizer when there is one) and load that state dict into it, so
the result is a ``LoadedModel`` exactly like ``load_model`` returns.

DeepSpeed is an optional dependency, imported only here.  Install it against the existing
torch (it ships as an sdist)::

    pip install --no-build-isolation deepspeed
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import torch

from coupling.errors import ModelLoadError
from coupling.model.loading import (LoadedModel, _hidden_size, _load_tokenizer, _model_class,
                                    _num_layers, parse_dtype)

INSTALL_HINT = "pip install --no-build-isolation deepspeed"


def zero_tags(zero_dir) -> list[str]:
    """Tags (sub-folders holding ``*model_states.pt``) of a ZeRO checkpoint directory, sorted."""
    root = Path(zero_dir)
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any(p.glob("*model_states.pt")))


def resolve_tag(zero_dir, tag: str | None = None) -> str:
    """The tag to read: ``tag`` if given, else the one named in ``zero_dir/latest``.

    Raises ValueError naming the directory, the tags present and the fix.
    """
    root = Path(zero_dir)
    if not root.is_dir():
        raise ValueError(f"ZeRO checkpoint directory {root} does not exist: pass the folder "
                         "given to engine.save_checkpoint()")
    tags = zero_tags(root)
    if not tags:
        raise ValueError(f"{root} holds no DeepSpeed checkpoint (no <tag>/*model_states.pt): "
                         "pass the folder given to engine.save_checkpoint()")
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise ValueError(f"{root} has no 'latest' file: pass a tag, one of {', '.join(tags)}")
        tag = latest.read_text().strip()
    if tag not in tags:
        raise ValueError(f"tag {tag!r} is not in {root}: choose one of {', '.join(tags)}")
    return tag


def _import_zero_to_fp32():
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as e:
        raise ModelLoadError(f"reading a ZeRO checkpoint needs DeepSpeed ({e}): "
                             f"{INSTALL_HINT}") from None
    return zero_to_fp32


def read_zero_state_dict(zero_dir, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The consolidated fp32 state dict of a ZeRO-2/3 checkpoint (parameter name -> tensor).

    DeepSpeed prints its progress to stdout; it is sent to stderr so that command-line
    output stays clean.
    """
    tag = resolve_tag(zero_dir, tag)
    z = _import_zero_to_fp32()
    with contextlib.redirect_stdout(sys.stderr):
        state = z.get_fp32_state_dict_from_zero_checkpoint(str(zero_dir), tag=tag)
    return dict(state)


def state_dict_sha256(state: dict[str, torch.Tensor], limit_bytes: int = 2 << 30) -> str | None:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order; None when large."""
    if sum(t.numel() * t.element_size() for t in state.values()) > limit_bytes:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """``{name: every name of the same tensor}`` for parameters shared under several names
    (tied input/output embeddings...)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), set()).add(name)
    return {n: g for g in groups.values() if len(g) > 1 for n in g}


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str):
    """``load_state_dict`` that tolerates only missing *tied* copies and non-persistent buffers.

    Anything else missing or unexpected means the config does not describe the checkpointed
    model: ValueError listing a few names.
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:          # shape mismatches are raised even with strict=False
        first = (str(e).strip().splitlines() or [""])[-1].strip()
        raise ValueError(f"the weights in {where} do not fit the model built from the config "
                         f"({first}): pass the config folder of the model that was trained") from None
    aliases = tied_aliases(model)
    present = set(state)
    # a tied parameter is loaded when any of its aliases was
    missing = [k for k in missing if not aliases.get(k, set()) & present]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"the weights in {where} do not fit the model built from the config: "
                         f"{'; '.join(parts)}. Pass the config folder of the model that was "
                         "trained (the same architecture and sizes)")


def load_zero_checkpoint(zero_dir, config_dir, tag: str | None = None, *, dtype="float32",
                         tokenizer_dir=None, attn_implementation: str = "eager",
                         trust_remote_code: bool = False) -> LoadedModel:
    """A ``LoadedModel`` from a DeepSpeed ZeRO-2/3 checkpoint, ready for ``coupling.scan``.

    ``zero_dir``: the folder given to ``engine.save_checkpoint``; ``tag``: its sub-folder
    (default: the one named in ``zero_dir/latest``).  ``config_dir``: a folder with the
    model's ``config.json`` (a ``save_pretrained`` folder or hub-style config); its tokenizer
    is used unless ``tokenizer_dir`` names another folder.  Weights are the fp32 master
    copies, cast to ``dtype``.
    """
    import transformers as tf

    tag = resolve_tag(zero_dir, tag)
    torch_dtype = parse_dtype(dtype)
    try:
        config = tf.AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"could not read a model config from {config_dir!r}: {first} "
                             "(pass a folder holding config.json)") from None
    state = read_zero_state_dict(zero_dir, tag)
    net = _model_class(config).from_config(config, attn_implementation=attn_implementation,
                                           dtype=torch.float32,
                                           trust_remote_code=trust_remote_code)
    load_state_into(net, state, f"{zero_dir} (tag {tag})")
    net = net.to(torch_dtype).eval().requires_grad_(False)
    tok_source = str(tokenizer_dir or config_dir)
    tokenizer = _load_tokenizer(tok_source, dict(trust_remote_code=trust_remote_code))
    info = dict(id=f"zero:{os.fspath(zero_dir)}", path=os.fspath(zero_dir), revision=tag,
                dtype=str(torch_dtype).removeprefix("torch."), random_init=False, seed=None,
                model_type=config.model_type, architecture=type(net).__name__,
                n_params=sum(p.numel() for p in net.parameters()),
                n_layers=_num_layers(config), d_model=_hidden_size(config),
                weights_sha256=state_dict_sha256(state), format="deepspeed-zero",
                config_path=os.fspath(config_dir))
    return LoadedModel(net, tokenizer, config, info)
