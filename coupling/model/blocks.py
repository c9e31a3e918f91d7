"""Find a model's transformer blocks and call one of them in isolation.

Every family passes its blocks different extra arguments (attention masks, position ids,
rotary ``position_embeddings``, ALiBi biases, cache positions...).  Rather than rebuilding
them per family we record each block's *real* call with a forward pre-hook during one
ordinary forward pass and replay it with a different hidden-state input.  This is
family-agnostic and, on CPU float32, bitwise identical to the model's own call.
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

# Dotted paths of the block list in common families, tried before the generic search.
KNOWN_BLOCK_PATHS = (
    "transformer.h", "gpt_neox.layers", "model.layers", "model.language_model.layers",
    "model.decoder.layers", "transformer.blocks", "transformer.layers", "layers",
    "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "vit.encoder.layer",
    "vit.layers",     # ViTForImageClassification, transformers >= 5.24
    "distilbert.transformer.layer", "h",
)

# Final normalisation modules (applied by HF to the last hidden state).
KNOWN_FINAL_NORM_PATHS = (
    "transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm", "model.final_layernorm",
    "model.language_model.norm", "model.decoder.final_layer_norm", "transformer.norm_f",
    "layernorm", "vit.layernorm", "norm", "ln_f",
)


class BlockNotFoundError(ValueError):
    pass


def get_submodule(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module, block_path: str | None = None, n_layers: int | None = None):
    """Return ``(path, blocks)`` with ``blocks`` the ``nn.ModuleList`` of transformer blocks.

    ``block_path`` overrides the search (e.g. ``"model.layers"``).  Otherwise known paths are
    tried, then the largest ``ModuleList`` of identical modules whose length matches the
    config's layer count.
    """
    if block_path is not None:
        blocks = get_submodule(model, block_path)
        if not isinstance(blocks, nn.ModuleList):
            raise BlockNotFoundError(
                f"block_path {block_path!r} is not an nn.ModuleList in {type(model).__name__}: "
                "pass the dotted path of the list holding the blocks (print(model) shows it)")
        return block_path, blocks
    for path in KNOWN_BLOCK_PATHS:
        blocks = get_submodule(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and (n_layers in (None, len(blocks))):
            return path, blocks
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 1
                  and len({type(c) for c in m}) == 1 and (n_layers in (None, len(m)))]
    if candidates:
        return max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    raise BlockNotFoundError(
        f"could not find the transformer block list in {type(model).__name__}: pass "
        "block_path='<dotted.path>' (CLI: --block-path), the nn.ModuleList holding the blocks, "
        "e.g. 'model.layers' (print(model) shows the structure)")


def find_final_norm(model: nn.Module) -> nn.Module | None:
    for path in KNOWN_FINAL_NORM_PATHS:
        mod = get_submodule(model, path)
        if isinstance(mod, nn.Module) and not isinstance(mod, nn.ModuleList):
            return mod
    return None


@dataclass
class BlockCall:
    """One recorded call of a block: its args/kwargs, input ``X^{l-1}`` and output ``X^l``."""

    index: int
    module: nn.Module
    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool  # True when hidden states were passed as kwargs["hidden_states"]

    output: torch.Tensor | None = None
    # every attention's (K, V) of the whole prompt, as its cache received them, when they were
    # recorded with the call (the fast path then needs no block call of its own to get them)
    kv: list | None = None

    @property
    def input(self) -> torch.Tensor:
        return self.kwargs["hidden_states"] if self.hidden_in_kwargs else self.args[0]

    def replay(self, hidden: torch.Tensor, module: nn.Module | None = None,
               kv_cache=None) -> torch.Tensor:
        """Call the block on ``hidden`` with every other argument exactly as recorded.

        ``kv_cache``: a factory of recording caches (as for :class:`CallRecorder`); the
        keys/values the block gives its cache are then kept in ``self.kv``."""
        module = self.module if module is None else module
        if self.hidden_in_kwargs:
            args, kwargs = self.args, {**self.kwargs, "hidden_states": hidden}
        else:
            args, kwargs = (hidden, *self.args[1:]), self.kwargs
        name = cache_parameter(module) if kv_cache is not None else None
        if name is None:
            return first_tensor(module(*args, **kwargs))
        cache = kv_cache()
        injected = with_cache(module, name, args, kwargs, cache)
        if injected is None:
            return first_tensor(module(*args, **kwargs))
        out = module(*injected[0], **injected[1])
        self.kv = cache.recorded or None
        return first_tensor(out)

    def cast(self, dtype: torch.dtype) -> "BlockCall":
        """A copy whose floating-point tensors (masks, rotary tables...) are in ``dtype``."""
        same = self.kv is not None and all(K.dtype == dtype for K, _ in self.kv)
        return BlockCall(self.index, self.module, _cast(self.args, dtype),
                         _cast(self.kwargs, dtype), self.hidden_in_kwargs, self.output,
                         self.kv if same else None)


def first_tensor(out):
    """Blocks return a tensor (transformers 5) or a tuple whose first entry is the states."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


class CallRecorder:
    """Context manager recording every block's call (pre-hook) and output (forward hook).

    ``kv_cache``: a factory of recording caches (:class:`coupling.model.kv_cache._PrefixKV`);
    given, each block gets one in its cache argument, which hands the keys/values back
    unchanged and keeps them (``BlockCall.kv``), so that the one-token functions of
    :mod:`coupling.jacobian.fastpath` need no block call of their own to get them.
    """

    def __init__(self, blocks: nn.ModuleList, kv_cache=None):
        self.blocks = blocks
        self.calls: list[BlockCall | None] = [None] * len(blocks)
        self.kv_cache = kv_cache
        self._caches: list = [None] * len(blocks)
        self._handles = []

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, i):
        def hook(module, args, kwargs):
            in_kwargs = not args
            if in_kwargs and "hidden_states" not in kwargs:
                raise BlockNotFoundError(
                    f"block {i} ({type(module).__name__}) was called without positional "
                    "arguments or a 'hidden_states' keyword: cannot tell its input")
            # Caches would mutate on replay: blocks are always replayed without one.
            cache = cache_parameter(module)
            kw = {k: v for k, v in kwargs.items() if k != cache and k not in CACHE_NAMES}
            if "use_cache" in kw:
                kw["use_cache"] = False
            self.calls[i] = BlockCall(i, module, _detach(tuple(args)), _detach(kw), in_kwargs)
            if self.kv_cache is not None and cache is not None:
                self._caches[i] = self.kv_cache()
                injected = with_cache(module, cache, args, kwargs, self._caches[i])
                if injected is None:
                    self._caches[i] = None
                return injected
        return hook

    def _post(self, i):
        def hook(module, args, out):
            self.calls[i].output = first_tensor(out).detach()
            if self._caches[i] is not None:
                self.calls[i].kv = self._caches[i].recorded or None
                self._caches[i] = None
        return hook


def with_cache(module: nn.Module, name: str, args: tuple, kwargs: dict, cache):
    """``(args, kwargs)`` of a call of ``module`` with ``cache`` in its cache argument ``name``
    (positional or by name, as the call passed it, or through ``**kwargs``) and ``use_cache``
    on, as a call with a cache has it; None when the call does not bind."""
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    extra = next((k for k, p in sig.parameters.items()
                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    named = name in sig.parameters and name != extra
    if not named and extra is None:
        return None
    more = dict(bound.arguments.get(extra, {})) if extra else {}
    if named:
        bound.arguments[name] = cache
    else:
        more[name] = cache
    for where in (bound.arguments, more):
        if "use_cache" in where:
            where["use_cache"] = True
    if extra:
        bound.arguments[extra] = more
    return tuple(bound.args), dict(bound.kwargs)


# Names the KV-cache argument has had (transformers 4.x: past_key_value(s), layer_past;
# 5.24+: cache).  Only a fallback: the name is read from the signature's annotation first.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
_CACHE_TYPE = re.compile(r"\b\w*Cache\b")


def _annotated_cache(fn) -> str | None:
    """The parameter of ``fn`` annotated with a ``...Cache`` type, if any."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for name, p in params.items():
        ann = p.annotation
        if ann is inspect.Parameter.empty or p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", None) or repr(ann)
        if _CACHE_TYPE.search(str(text)):
            return name
    return None


_CACHE_PARAMETER: dict = {}    # block class -> its cache argument (the signature is per class)


def cache_parameter(module: nn.Module) -> str | None:
    """Name of a block's KV-cache argument, read from its signature, not from a list.

    transformers renames it now and then (``layer_past`` -> ``past_key_values`` -> ``cache``
    in 5.24, the old name a deprecated alias the block ignores when both are given), so the
    parameter annotated with a ``Cache`` type wins.  A block that only forwards ``**kwargs``
    to its attention takes the name its attention submodule declares.  ``None``: no cache.
    Read once per block class (the recorder asks for every block of every forward pass).
    """
    cls = type(module)
    if cls not in _CACHE_PARAMETER:
        _CACHE_PARAMETER[cls] = _find_cache_parameter(module)
    return _CACHE_PARAMETER[cls]


def _find_cache_parameter(module: nn.Module) -> str | None:
    forward = getattr(module, "forward", None)
    name = _annotated_cache(forward)
    if name is not None:
        return name
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    named = next((n for n in CACHE_NAMES if n in params), None)
    if named is not None:
        return named
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for sub in module.modules():
            if sub is not module:
                name = _annotated_cache(getattr(sub, "forward", None))
                if name is not None:
                    return name
    return None


def float32_block(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """The block itself, or a ``compute_dtype`` copy of it when its weights are lower precision.

    Jacobians of bf16/fp16 models are taken in float32 (one block copied at a time).
    """
    param = next(module.parameters(), None)
    if param is None or param.dtype == compute_dtype:
        return module
    return copy.deepcopy(module).to(compute_dtype)


def residual_branch(call: BlockCall, compute_dtype: torch.dtype = torch.float32,
                    final_norm: nn.Module | None = None):
    """``f(X) = block(X) - X`` for one recorded call, as a function of a ``(1, n, d)`` input.

    With ``final_norm`` the block output is normalised first (``norm(block(X)) - X``), as the
    paper does for the last block (its Eq. 7) and as the authors' released code did.
    """
    module = float32_block(call.module, compute_dtype)
    call = call.cast(compute_dtype)
    norm = float32_block(final_norm, compute_dtype) if final_norm is not None else None

    def f(hidden: torch.Tensor) -> torch.Tensor:
        out = call.replay(hidden, module)
        if norm is not None:
            out = norm(out)
        return out - hidden

    return f
