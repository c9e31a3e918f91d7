"""One block-range stage: blocks ``[lo, hi)`` of a model and its share of a prompt's analysis.

Per prompt a stage does three things (each a Ray actor method in ``ray_jobs.actors``):

``forward(x_in)``
    runs its blocks on the hidden states received from the previous stage (the first stage
    embeds the token ids itself) and returns ``x_out`` for the next stage plus a
    ``ForwardRecord`` of its own blocks only (their real calls and its slice ``X^lo..X^hi``
    of the trajectory).
``decompose()``
    takes the Jacobians ``J^l_{tt}`` of its own blocks and their top-K SVDs; only the ``d x K``
    factors ``(U, S, V)`` leave the stage.
``couple(all_svds)``
    with every layer's factors, computes its rows of the ``L x L`` coupling grids (the
    Jacobians never move); the last stage also computes the regularity measures from the full
    trajectory and the logit lens (it holds the final norm and unembedding).

Each is a thin wrapper over the steps of ``coupling.analysis.steps`` -- the ones
``coupling.analysis.prompt.analyze_prompt`` runs on the whole model -- and ``assemble`` there builds
the prompt's result from the stages' parts.

**Block arguments** (attention masks, position ids, rotary ``position_embeddings``...) are
not rebuilt per family.  The stage runs the model's own ``forward`` with every block replaced
by a pass-through stub and records the stubs' calls with ``coupling.model.blocks.CallRecorder``;
the last stub stops the forward, so no block and no head is computed.  The first stage
passes the real ``input_ids`` (the first stub's input *is* ``X^0``); the other stages pass
``inputs_embeds`` of zeros, and any weight-holding module before the blocks that they do not
own (GPT-2's position embedding) is stubbed as well.  Masks and positions depend only on the
prompt's length and dtype, so they are the ones the full model builds.  This works unchanged
for GPT-2 (positional mask arguments, learned positions) and Llama (keyword arguments, rotary
tables computed in the base model).
"""
from __future__ import annotations

import torch
from torch import nn

from coupling.analysis.steps import (PromptResult, assemble, couple_token, decompose_token,
                                     depth_part, layer_jacobians, lens_heads, token_grids,
                                     token_layers, traced_tokens, trajectory_regularity)
from coupling.model.blocks import BlockCall, CallRecorder, find_blocks, find_final_norm
from coupling.model.trajectory import ForwardRecord, with_last_block
from coupling.settings.scan_settings import ScanSettings
from ray_jobs.weights import (build_skeleton, locate_weights, materialize, materialized_numel,
                              model_layout)


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
    """Stands in for an embedding whose weights this stage does not hold."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids, *args, **kwargs):
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class _Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class StageModel:
    """Blocks ``[lo, hi)`` (0-based) of the model ``source`` (folder or hub id), nothing else
    in memory."""

    def __init__(self, source, config, lo: int, hi: int, dtype="float32",
                 device: str = "cpu", block_path: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None):
        self.model = build_skeleton(config, dtype, trust_remote_code)
        self.layout = model_layout(self.model, block_path, _n_layers(config))
        self.n_layers = self.layout.n_layers
        if not 0 <= lo < hi <= self.n_layers:
            raise ValueError(f"stage blocks [{lo}, {hi}) outside 0..{self.n_layers}")
        self.lo, self.hi = lo, hi
        self.first, self.last = lo == 0, hi == self.n_layers
        self.config, self.device = config, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.owned = self.layout.stage_names(lo, hi)
        files = locate_weights(self.model, source, self.owned, revision)
        self.bytes_read = materialize(self.model, self.owned, files, dtype, self.device)
        for mod in self.model.modules():      # real buffers (rotary inv_freq...) follow
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != self.device:
                    mod._buffers[name] = buf.to(self.device)
        _, self.blocks = find_blocks(self.model, self.layout.block_path)
        self.dtype = next(p for p in self.model.parameters() if p.device.type != "meta").dtype
        self.d = _hidden(config)

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Parameters held in memory (owned blocks + embedding/head where owned)."""
        return materialized_numel(self.model)

    @property
    def layers(self) -> range:
        """The owned layers, 1-based as in the paper."""
        return range(self.lo + 1, self.hi + 1)

    # -- step 1: forward -----------------------------------------------------------------
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
        """Weight-holding modules outside the blocks that this stage does not hold."""
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
        """Run the owned blocks.  ``x_in``: token ids ``(1, n)`` on the first stage, else the
        previous stage's output ``(1, n, d)``.  Returns ``(x_out, record)``: the
        ``ForwardRecord`` of the owned blocks (real calls, ``X^lo..X^hi``; on the last stage
        ``X^L`` as ``last_block`` says)."""
        ids = x_in if self.first else torch.zeros(1, x_in.shape[1], dtype=torch.long)
        x0, templates = self.block_calls(ids)
        x = x0 if self.first else x_in.to(self.device, self.dtype)
        states, calls = [x[0].float()], []
        for i in range(self.lo, self.hi):
            call = _with_input(templates[i], self.blocks[i], x)
            x = call.replay(x)
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

    # -- step 2: Jacobians and SVDs ------------------------------------------------------
    def decompose(self, record: ForwardRecord, settings: ScanSettings) -> tuple:
        """Top-K factors (shipped) of the owned layers per traced token, and what to keep.

        Returns ``(kept, factors)``: ``kept["J"]`` is ``{t: {l: J}}`` when the Jacobians are
        dense (costly to rebuild) and None for operators, which ``couple`` rebuilds rather than
        keeping their VJP residuals alive while the prompt waits in the pipeline;
        ``kept["functions"]`` says which function each was taken of, ``kept["deflation"]``
        holds the ``--deflate-ln`` records; ``factors`` is ``{t: {l: SVDResult}}`` on the CPU
        (``U, S, V``, ``s_{K+1}``, any ARPACK fall-back).
        """
        jacobians, factors, blocks, functions = {}, {}, {}, {}
        record.cache["deflation"] = {}
        for t in traced_tokens(record.n_tokens, settings):
            jacobians[t], svds = decompose_token(record, self.layers, t, settings, self.model,
                                                 blocks, functions)
            factors[t] = {l: s.to("cpu") for l, s in svds.items()}
        dense = all(isinstance(J, torch.Tensor) for jac in jacobians.values()
                    for J in jac.values())
        return ({"J": jacobians if dense else None, "functions": functions,
                 "deflation": dict(record.cache["deflation"])}, factors)

    # -- step 3: coupling rows (+ regularity on the last stage) --------------------------
    def couple(self, record: ForwardRecord, kept: dict | None, all_factors: list,
               settings: ScanSettings) -> dict:
        """This stage's ``coupling.analysis.steps.depth_part``: its rows of the normalized and
        raw grids averaged over traced tokens, the spectra of its layers at the last token,
        their flags per traced token.  ``kept``: ``decompose``'s first output (None on a
        restarted actor); ``all_factors``: every stage's factors."""
        kept = kept or {"J": None, "functions": {}, "deflation": {}}
        jacobians = kept["J"]
        if jacobians is None:
            blocks = {}
            jacobians = {t: layer_jacobians(record, self.layers, t, settings, self.model,
                                            blocks=blocks)
                         for t in traced_tokens(record.n_tokens, settings)}
        rows, flags = [], []
        for t, jac in jacobians.items():
            svds = {l: f.to(self.device) for part in all_factors for l, f in part[t].items()}
            grid, flag = couple_token(jac, svds, self.n_layers, settings.k)
            rows.append(grid)
            flags.append(flag)
        last = max(jacobians)                       # the last token, whichever are traced
        spectra = {l: f for part in all_factors for l, f in part[last].items()
                   if l in self.layers}
        return depth_part(rows, flags, spectra, kept["functions"], kept["deflation"])

    def regularity(self, trajectory: torch.Tensor, settings: ScanSettings) -> dict:
        """Regularity measures from the full ``(L+1, n, d)`` trajectory (last stage only:
        the logit lens needs its final norm and unembedding)."""
        if not self.last:
            raise RuntimeError("regularity needs the final norm and head: last stage only")
        return trajectory_regularity(trajectory.to(self.device), settings.lss_window,
                                     *lens_heads(self.model, settings.last_block))

    def tokens(self, record: ForwardRecord, settings: ScanSettings) -> dict:
        """Token-wise coupling; both token layers must be owned by this stage."""
        return token_grids(record, settings, self.model)


# ------------------------------------------------------------------------------------------
# The driver's side
# ------------------------------------------------------------------------------------------
def trajectory_of(slices) -> torch.Tensor:
    """``(L+1, n, d)`` float32 from the stages' ``{l: X^l}`` slices."""
    merged = {l: x for part in slices for l, x in part.items()}
    return torch.stack([merged[l].float() for l in range(max(merged) + 1)])


def run_pipeline(stages: list, input_ids, settings: ScanSettings, prompt_id: str = "prompt",
                 meta: dict | None = None) -> PromptResult:
    """The block-range analysis of one prompt with every stage in this process (no Ray):
    exactly the messages the Ray pipeline exchanges, in the same order."""
    x, records = torch.as_tensor(input_ids), []
    for st in stages:
        x, rec = st.forward(x, settings.last_block)
        records.append(rec)
    decomposed = [st.decompose(r, settings) for st, r in zip(stages, records)]
    factors = [d[1] for d in decomposed]
    depth = [st.couple(r, d[0], factors, settings)
             for st, r, d in zip(stages, records, decomposed)] \
        if "depth" in settings.measures else None
    reg = tok = None
    if "regularity" in settings.measures:
        reg = stages[-1].regularity(trajectory_of(r.states() for r in records), settings)
    if "tokens" in settings.measures:
        l, lp = token_layers(settings, stages[0].n_layers)
        owner = [i for i, st in enumerate(stages) if l in st.layers and lp in st.layers]
        if not owner:
            raise ValueError(f"token layers ({l}, {lp}) are not on one stage")
        tok = stages[owner[0]].tokens(records[owner[0]], settings)
    return assemble(prompt_id, records[0].n_tokens, meta, depth, tok, reg)


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


def _n_layers(config) -> int | None:
    from coupling.model.loading import _num_layers
    return _num_layers(config)


def _hidden(config) -> int:
    from coupling.model.loading import _hidden_size
    return _hidden_size(config)
