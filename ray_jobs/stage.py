"""One block-range stage: blocks ``[lo, hi)`` of a model and its share of a prompt's analysis.

Per prompt a stage does three things (each a Ray actor method in ``ray_jobs.actors``):

``forward(x_in)``
    runs its blocks on the hidden states received from the previous stage (the first stage
    embeds the token ids itself) and returns ``x_out`` for the next stage plus its slice of
    the trajectory ``X^l``.
``decompose()``
    takes the Jacobians ``J^l_{tt}`` of its own blocks and their top-K SVDs; only the ``d x K``
    factors ``(U, S, V)`` leave the stage.
``couple(all_svds)``
    with every layer's factors, computes its rows of the ``L x L`` coupling grids (the
    Jacobians never move); the last stage also computes the regularity measures from the full
    trajectory and the logit lens (it holds the final norm and unembedding).

**Block arguments** (attention masks, position ids, rotary ``position_embeddings``...) are
not rebuilt per family.  The stage runs the model's own ``forward`` with every block replaced
by a pass-through stub and records the stubs' calls with ``coupling.blocks.CallRecorder``;
the last stub stops the forward, so no block and no head is computed.  The first stage
passes the real ``input_ids`` (the first stub's input *is* ``X^0``); the other stages pass
``inputs_embeds`` of zeros, and any weight-holding module before the blocks that they do not
own (GPT-2's position embedding) is stubbed as well.  Masks and positions depend only on the
prompt's length and dtype, so they are the ones the full model builds.  This works unchanged
for GPT-2 (positional mask arguments, learned positions) and Llama (keyword arguments, rotary
tables computed in the base model).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from coupling.analysis import (PromptResult, ScanSettings, analyze_prompt, coupling_rows,
                               layer_jacobians, layer_svds, norm_kind, record_spectra,
                               spectral_flags)
from coupling.blocks import BlockCall, CallRecorder, find_blocks, find_final_norm
from coupling.coupling_metrics import mean_off_diagonal, nan_off_diagonal
from coupling.loading import LoadedModel
from coupling.trajectory import ForwardRecord

from .weights import (build_skeleton, locate_weights, materialize, materialized_numel,
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


@dataclass
class StageForward:
    """What ``forward`` keeps for later steps: calls of the owned blocks and their states."""

    calls: dict            # 0-based block index -> BlockCall (input, kwargs, output)
    states: dict           # l -> X^l (n, d) float32, l in lo..hi (X^L after the final norm)
    raw_last: torch.Tensor | None


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
    def forward(self, x_in: torch.Tensor) -> tuple:
        """Run the owned blocks.  ``x_in``: token ids ``(1, n)`` on the first stage, else the
        previous stage's output ``(1, n, d)``.  Returns ``(x_out, StageForward)``."""
        ids = x_in if self.first else torch.zeros(1, x_in.shape[1], dtype=torch.long)
        x0, templates = self.block_calls(ids)
        x = x0 if self.first else x_in.to(self.device, self.dtype)
        states = {self.lo: x[0].float()}
        calls = {}
        for i in range(self.lo, self.hi):
            call = _with_input(templates[i], self.blocks[i], x)
            x = call.replay(x)
            call.output = x
            calls[i] = call
            states[i + 1] = x[0].float()
        raw_last = None
        if self.last:
            raw_last = x
            norm = find_final_norm(self.model)
            if norm is not None:        # X^L carries the final norm (Hugging Face convention)
                states[self.hi] = norm(x)[0].float()
        return x, StageForward(calls, states, raw_last)

    def record(self, fwd: StageForward, trajectory: torch.Tensor | None = None) -> ForwardRecord:
        """A ``ForwardRecord`` the library's per-layer functions accept: owned calls real,
        the others the (weightless) skeleton blocks, so nothing can silently use them."""
        L = self.n_layers
        n, d = next(iter(fwd.states.values())).shape
        if trajectory is None:
            trajectory = torch.full((L + 1, n, d), float("nan"), device=self.device)
            for l, x in fwd.states.items():
                trajectory[l] = x
        trajectory = trajectory.to(self.device)
        calls = [fwd.calls.get(i) or BlockCall(i, self.blocks[i], (), {}, False) for i in range(L)]
        return ForwardRecord(trajectory, calls, self.layout.block_path, fwd.raw_last)

    # -- step 2: Jacobians and SVDs ------------------------------------------------------
    def jacobians(self, fwd: StageForward, settings: ScanSettings,
                  functions: dict | None = None, deflation: dict | None = None) -> dict:
        """``{t: {l: J^l_{tt}}}`` of the owned layers: dense on the exact path, else
        matrix-free operators (cheap to build: one block call per layer captures the prefix
        keys/values of the one-token function).  ``functions`` is filled with
        ``{l: [kind, reason]}`` (see ``coupling.analysis.layer_jacobians``), ``deflation``
        with the owned layers' ``--deflate-ln`` records (``PromptResult.deflation``)."""
        rec = self.record(fwd)
        kind = norm_kind(self.model)
        blocks = {}   # one FastBlock per layer, shared by every traced token
        out = {t: layer_jacobians(rec, self.layers, t, settings, self.model, kind, blocks,
                                  functions)
               for t in traced_tokens(rec.n_tokens, settings)}
        if deflation is not None:
            deflation.update(rec.cache.get("deflation", {}))
        return out

    def decompose(self, fwd: StageForward, settings: ScanSettings) -> tuple:
        """Top-K factors (shipped) of the owned layers per traced token, and what to keep.

        Returns ``(kept, factors)``: ``kept["J"]`` is ``{t: {l: J}}`` when the Jacobians are
        dense (costly to rebuild) and None for operators, which ``couple`` rebuilds rather than
        keeping their VJP residuals alive while the prompt waits in the pipeline;
        ``kept["functions"]`` says which function each was taken of; ``factors`` is
        ``{t: {l: SVDResult}}`` on the CPU (``U, S, V``, ``s_{K+1}``, any ARPACK fall-back).
        """
        functions, deflation = {}, {}
        jacobians = self.jacobians(fwd, settings, functions, deflation)
        factors, dense = {}, True
        for t, jac in jacobians.items():
            svds = layer_svds(jac, settings)
            factors[t] = {l: s.to("cpu") for l, s in svds.items()}
            dense = dense and all(isinstance(J, torch.Tensor) for J in jac.values())
        return ({"J": jacobians if dense else None, "functions": functions,
                 "deflation": deflation}, factors)

    # -- step 3: coupling rows (+ regularity on the last stage) --------------------------
    def couple(self, fwd: StageForward, kept: dict | None, all_factors: list,
               settings: ScanSettings) -> dict:
        """This stage's rows of the normalized and raw grids, averaged over traced tokens.

        ``kept``: ``decompose``'s first output; ``all_factors``: every stage's factors.
        Returns ``{"normalized": (hi-lo, L), "raw": (hi-lo, L), "spectra": {l: SVDResult}}``,
        the spectra of the owned layers at the last token (what the scan reports), and
        ``"flags"``: their ``coupling.analysis.spectral_flags`` per traced token.
        """
        kept = kept or {"J": None, "functions": {}, "deflation": {}}
        jacobians = kept["J"] if kept["J"] is not None else self.jacobians(fwd, settings)
        norm_rows, raw_rows, flags = [], [], []
        for t, jac in jacobians.items():
            svds = {l: f.to(self.device) for part in all_factors for l, f in part[t].items()}
            grid = coupling_rows(jac, svds, self.n_layers, settings.k)
            norm_rows.append(grid["normalized"])
            raw_rows.append(grid["raw"])
            flags.append(spectral_flags({l: svds[l] for l in self.layers}))
        last = max(jacobians)                       # the last token, whichever are traced
        spectra = {l: f for part in all_factors for l, f in part[last].items()
                   if l in self.layers}
        return {"normalized": np.mean(norm_rows, axis=0), "raw": np.mean(raw_rows, axis=0),
                "spectra": spectra, "flags": flags, "functions": kept["functions"],
                "deflation": kept.get("deflation", {})}

    def regularity(self, fwd: StageForward, trajectory: torch.Tensor, settings: ScanSettings,
                   prompt_id: str, meta: dict) -> PromptResult:
        """Regularity measures from the full ``(L+1, n, d)`` trajectory (last stage only)."""
        if not self.last:
            raise RuntimeError("regularity needs the final norm and head: last stage only")
        only = dataclasses.replace(settings, measures=("regularity",))
        return analyze_prompt(self._as_loaded(), None, only, prompt_id, meta,
                              record=self.record(fwd, trajectory))

    def tokens(self, fwd: StageForward, settings: ScanSettings, prompt_id: str,
               meta: dict) -> PromptResult:
        """Token-wise coupling; both token layers must be owned by this stage."""
        only = dataclasses.replace(settings, measures=("tokens",))
        return analyze_prompt(self._as_loaded(), None, only, prompt_id, meta,
                              record=self.record(fwd))

    def _as_loaded(self) -> LoadedModel:
        return LoadedModel(self.model, None, self.config,
                           {"n_layers": self.n_layers, "d_model": self.d})


# ------------------------------------------------------------------------------------------
# Helpers shared with the driver
# ------------------------------------------------------------------------------------------
def traced_tokens(n_tokens: int, settings: ScanSettings) -> list:
    return [n_tokens - 1] if settings.token == "last" else list(range(n_tokens))


def token_layers(settings: ScanSettings, n_layers: int) -> tuple:
    """The (l, l') token-wise coupling uses, exactly as ``coupling.analysis`` picks them."""
    L = n_layers
    return tuple(settings.token_layers or (max(1, L // 2), min(L, L // 2 + 1)))


def assemble(prompt_id: str, n_tokens: int, meta: dict, rows: list,
             regularity: PromptResult | None, tokens: PromptResult | None,
             settings: ScanSettings) -> PromptResult:
    """One ``PromptResult`` from the stages' parts, in the local scan's field order.

    ``rows``: every stage's ``couple`` output, in stage order.
    """
    res = PromptResult(prompt_id, n_tokens, dict(meta), {}, {})
    if "depth" in settings.measures:
        res.depth_normalized = np.concatenate([r["normalized"] for r in rows], axis=0)
        res.depth_raw = np.concatenate([r["raw"] for r in rows], axis=0)
        res.summary["depth_mis_coupling_mean"] = float(mean_off_diagonal(res.depth_normalized))
        res.summary["depth_mis_coupling_raw_mean"] = float(mean_off_diagonal(res.depth_raw))
        res.summary["depth_nan_entries"] = nan_off_diagonal(res.depth_normalized, res.depth_raw)
        spectra = {l: s for r in rows for l, s in r["spectra"].items()}
        flags = [{l: f for r in rows for l, f in r["flags"][i].items()}
                 for i in range(len(rows[0]["flags"]))]          # per traced token
        record_spectra(res, spectra, flags)
        res.jacobian_functions["depth"] = {l: f for r in rows
                                           for l, f in r.get("functions", {}).items()}
        res.deflation = {l: d for r in rows for l, d in r.get("deflation", {}).items()}
    if tokens is not None:
        res.tokens = tokens.tokens
        res.meta["token_layers"] = tokens.meta["token_layers"]
    if regularity is not None:
        res.summary.update(regularity.summary)
        res.layers = regularity.layers
        res.pca = regularity.pca
    return res


def run_pipeline(stages: list, input_ids, settings: ScanSettings, prompt_id: str = "prompt",
                 meta: dict | None = None) -> PromptResult:
    """The block-range analysis of one prompt with every stage in this process (no Ray):
    exactly the messages the Ray pipeline exchanges, in the same order."""
    meta = dict(meta or {})
    x, fwds = torch.as_tensor(input_ids), []
    for st in stages:
        x, fwd = st.forward(x)
        fwds.append(fwd)
    decomposed = [st.decompose(f, settings) for st, f in zip(stages, fwds)]
    factors = [d[1] for d in decomposed]
    rows = [st.couple(f, d[0], factors, settings) for st, f, d in zip(stages, fwds, decomposed)] \
        if "depth" in settings.measures else []
    n = fwds[0].states[0].shape[0]
    reg = tok = None
    if "regularity" in settings.measures:
        merged = {l: s for f in fwds for l, s in f.states.items()}
        traj = torch.stack([merged[l] for l in range(len(merged))])
        reg = stages[-1].regularity(fwds[-1], traj, settings, prompt_id, meta)
    if "tokens" in settings.measures:
        l, lp = token_layers(settings, stages[0].n_layers)
        owner = [i for i, st in enumerate(stages) if l in st.layers and lp in st.layers]
        if not owner:
            raise ValueError(f"token layers ({l}, {lp}) are not on one stage")
        tok = stages[owner[0]].tokens(fwds[owner[0]], settings, prompt_id, meta)
    return assemble(prompt_id, n, meta, rows, reg, tok, settings)


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
    from coupling.loading import _num_layers
    return _num_layers(config)


def _hidden(config) -> int:
    from coupling.loading import _hidden_size
    return _hidden_size(config)
