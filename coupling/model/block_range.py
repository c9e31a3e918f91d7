"""Blocks ``[lo, hi)`` of a model and nothing else in memory; optionally one block at a time.

A :class:`BlockRange` is built from the weightless skeleton (:mod:`coupling.model.weights`)
and reads from the safetensors files only the tensors it owns: a Ray pipeline stage
(``ray_jobs.stage``) holds its blocks this way, and the local scan of a model larger than
memory holds *no* block until it needs one (``lazy=True``): each block's tensors are read
(memory-mapped) when the block runs and dropped after (:meth:`BlockRange.hold`), so what does
not fit stays on disk.

**Block arguments** (attention masks, position ids, rotary ``position_embeddings``...) are
not rebuilt per family.  The range runs the model's own ``forward`` with every block replaced
by a pass-through stub and records the stubs' calls with ``coupling.model.blocks.CallRecorder``;
the last stub stops the forward, so no block and no head is computed.  The first range
passes the real ``input_ids`` (the first stub's input *is* ``X^0``); the others pass
``inputs_embeds`` of zeros, and any weight-holding module before the blocks that they do not
own (GPT-2's position embedding) is stubbed as well.  Masks and positions depend only on the
prompt's length and dtype, so they are the ones the full model builds.  This works unchanged
for GPT-2 (positional mask arguments, learned positions) and Llama (keyword arguments, rotary
tables computed in the base model).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from coupling.model.blocks import BlockCall, CallRecorder, find_blocks, find_final_norm
from coupling.model.kv_cache import _PrefixKV
from coupling.model.loading import (_hidden_size, _load_tokenizer, _num_layers, load_config,
                                    model_files, model_info, parse_dtype)
from coupling.model.trajectory import ForwardRecord, model_inputs, with_last_block
from coupling.model.weights import (build_skeleton, locate_weights, materialize,
                                    materialized_numel, model_layout, release)


class _StopForward(Exception):
    """Raised by the last stub: everything after the blocks is not needed."""


class _PassThrough(nn.Module):
    """Stands in for a block during the argument-recording pass: returns its input."""

    def __init__(self, stop: bool):
        super().__init__()
        self.stop = stop

    def forward(self, *args, **kwargs):
        if self.stop:
            raise _StopForward
        return kwargs["hidden_states"] if not args else args[0]


class _ZeroEmbedding(nn.Module):
    """Stands in for an embedding whose weights this range does not hold."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids, *args, **kwargs):
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class _Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class BlockRange:
    """Blocks ``[lo, hi)`` (0-based) of the model ``source`` (folder or hub id), nothing else
    in memory (plus the embedding on the first range, the final norm and head on the last).
    ``lazy``: no block is read until :meth:`hold` asks for it."""

    def __init__(self, source, config, lo: int, hi: int, dtype="float32",
                 device: str = "cpu", block_path: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None,
                 lazy: bool = False):
        self.model = build_skeleton(config, dtype, trust_remote_code)
        self.layout = model_layout(self.model, block_path, _num_layers(config))
        self.n_layers = self.layout.n_layers
        if not 0 <= lo < hi <= self.n_layers:
            raise ValueError(f"stage blocks [{lo}, {hi}) outside 0..{self.n_layers}")
        self.lo, self.hi, self.lazy = lo, hi, lazy
        self.first, self.last = lo == 0, hi == self.n_layers
        self.config, self.device = config, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = parse_dtype(dtype)
        self.owned = self.layout.stage_names(lo, hi)
        self.files = locate_weights(self.model, source, self.owned, revision)
        block_names = {n for i in range(lo, hi) for n in self.layout.blocks[i]}
        resident = [n for n in self.owned if not (lazy and n in block_names)]
        self.bytes_read = materialize(self.model, resident, self.files, dtype, self.device)
        for mod in self.model.modules():      # real buffers (rotary inv_freq...) follow
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != self.device:
                    mod._buffers[name] = buf.to(self.device)
        _, self.blocks = find_blocks(self.model, self.layout.block_path)
        self.d = _hidden_size(config)

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Parameters held in memory now (owned blocks + embedding/head where owned)."""
        return materialized_numel(self.model)

    @property
    def layers(self) -> range:
        """The owned layers, 1-based as in the paper."""
        return range(self.lo + 1, self.hi + 1)

    @contextmanager
    def hold(self, l: int, dtype: torch.dtype | None = None):
        """Block ``l`` (1-based) present while inside, in ``dtype`` (default the model's): read
        from the safetensors files and dropped on exit (back to ``meta``) when ``lazy``; a
        resident block is left as it is.  Each tensor is read in the model dtype, then
        converted: the same values as copying the resident block
        (``coupling.model.blocks.float32_block``), so the numbers do not depend on where the
        weights came from."""
        if not self.lazy:
            yield self.blocks[l - 1]
            return
        names = self.layout.blocks[l - 1]
        dtype = dtype or self.dtype
        block = self.blocks[l - 1]
        buffers = {(m, k): b for m in block.modules() for k, b in m._buffers.items()
                   if b is not None and b.is_floating_point()}
        self.bytes_read += materialize(self.model, names, self.files, self.dtype, self.device,
                                       upcast=dtype)
        for (m, k), b in buffers.items():
            m._buffers[k] = b.to(dtype)
        try:
            yield block
        finally:
            release(self.model, names)
            for (m, k), b in buffers.items():
                m._buffers[k] = b

    # -- forward -------------------------------------------------------------------------
    def block_calls(self, input_ids: torch.Tensor) -> tuple:
        """``(X^0 or None, {i: BlockCall template})`` from one pass through stubbed blocks."""
        n = input_ids.shape[-1]
        stubs = nn.ModuleList([_PassThrough(stop=(i == self.hi - 1)) for i in range(self.n_layers)])
        swaps = [(self.blocks, i, stubs[i]) for i in range(self.n_layers)]
        if not self.first:
            swaps += self._pre_block_stubs()
        saved = [(parent, key, _get(parent, key)) for parent, key, _ in swaps]
        for parent, key, new in swaps:
            _put(parent, key, new)
        try:
            with CallRecorder(stubs) as rec, torch.no_grad():
                kwargs = dict(use_cache=False, return_dict=True)
                if self.first:
                    kwargs["input_ids"] = input_ids.to(self.device)
                else:
                    kwargs["inputs_embeds"] = torch.zeros(1, n, self.d, dtype=self.dtype,
                                                          device=self.device)
                try:
                    self.model(**kwargs)
                except _StopForward:
                    pass
        finally:
            for parent, key, old in saved:
                _put(parent, key, old)
        calls = {i: rec.calls[i] for i in range(self.lo, self.hi)}
        missing = [i for i, c in calls.items() if c is None]
        if missing:
            raise RuntimeError(f"blocks {missing} were not called by {type(self.model).__name__}")
        x0 = calls[self.lo].input if self.first else None
        return x0, calls

    def _pre_block_stubs(self) -> list:
        """Weight-holding modules outside the blocks that this range does not hold."""
        out = []
        block_ids = {id(m) for m in self.blocks.modules()}
        for parent in self.model.modules():
            if id(parent) in block_ids:
                continue
            for key, child in parent.named_children():
                if id(child) in block_ids or child is self.blocks:
                    continue
                own = list(child.parameters(recurse=False))
                if own and all(p.device.type == "meta" for p in own):
                    stub = (_ZeroEmbedding(child.embedding_dim, self.dtype)
                            if isinstance(child, nn.Embedding) else _Identity())
                    out.append((parent, key, stub))
        return out

    @torch.no_grad()
    def forward(self, x_in: torch.Tensor, last_block: str = "with-final-norm") -> tuple:
        """Run the owned blocks.  ``x_in``: token ids ``(1, n)`` on the first range, else the
        previous range's output ``(1, n, d)``.  Returns ``(x_out, record)``: the
        ``ForwardRecord`` of the owned blocks (real calls, ``X^lo..X^hi``; on the last range
        ``X^L`` as ``last_block`` says)."""
        ids = x_in if self.first else torch.zeros(1, x_in.shape[1], dtype=torch.long)
        x0, templates = self.block_calls(ids)
        x = x0 if self.first else x_in.to(self.device, self.dtype)
        states, calls = [x[0].float()], []
        for i in range(self.lo, self.hi):
            call = _with_input(templates[i], self.blocks[i], x)
            with self.hold(i + 1):     # float32: its keys/values kept for the fast path
                x = call.replay(x, kv_cache=_PrefixKV if self.dtype == torch.float32 else None)
            call.output = x
            calls.append(call)
            states.append(x[0].float())
        norm = find_final_norm(self.model) if self.last else None
        if norm is not None:        # X^L carries the final norm (Hugging Face convention)
            states[-1] = norm(x)[0].float()
        record = ForwardRecord(torch.stack(states), calls, self.layout.block_path,
                               x if self.last else None, final_norm=norm, first=self.lo,
                               model_layers=self.n_layers)
        return x, with_last_block(record, last_block, self.model)


class StreamedModel:
    """The local scan's model when its weights are read from disk one block at a time: the
    fields of a ``LoadedModel`` (``model`` is the skeleton, only its embedding, final norm and
    head in memory) and the one-range lazy :class:`BlockRange` (``blocks``) that runs it."""

    def __init__(self, folder, dtype="float32", trust_remote_code: bool = False,
                 block_path: str | None = None, device: str = "cpu"):
        source = str(folder)      # a save_pretrained folder, or a GGUF file (parsed once)
        with model_files(source, None, trust_remote_code) as (where, common, gguf):
            self.config = load_config(source, None, trust_remote_code)
            self.blocks = BlockRange(folder, self.config, 0, _num_layers(self.config), dtype,
                                     device=device, block_path=block_path,
                                     trust_remote_code=trust_remote_code, lazy=True)
            self.tokenizer = gguf.tokenizer() if gguf is not None else _load_tokenizer(where,
                                                                                       common)
        self.model = self.blocks.model
        self.info = model_info(source, source, self.config, self.model, self.blocks.dtype)
        self.info.update(gguf.manifest() if gguf is not None else {})

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def forward(self, inputs, last_block: str = "with-final-norm") -> ForwardRecord:
        """The prompt's ``ForwardRecord``, each block read for its turn and dropped."""
        return self.blocks.forward(model_inputs(inputs)["input_ids"], last_block)[1]


def _with_input(template: BlockCall, block: nn.Module, x: torch.Tensor) -> BlockCall:
    if template.hidden_in_kwargs:
        return BlockCall(template.index, block, template.args,
                         {**template.kwargs, "hidden_states": x}, True)
    return BlockCall(template.index, block, (x,) + tuple(template.args[1:]), template.kwargs,
                     False)


def _get(parent, key):
    return parent[key] if isinstance(parent, nn.ModuleList) else getattr(parent, key)


def _put(parent, key, module):
    if isinstance(parent, nn.ModuleList):
        parent[key] = module
    else:
        setattr(parent, key, module)
