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

Each is a thin wrapper over the steps of ``coupling.analysis`` -- the ones
``coupling.analysis.prompt.analyze_prompt`` runs on the whole model -- and ``assemble`` there
builds the prompt's result from the stages' parts.

The blocks, their weights and the forward are a ``coupling.model.block_range.BlockRange``
(which reads only the owned tensors, and records the blocks' arguments without rebuilding
them per family); the Jacobians, factors and coupling rows are the two passes of
``coupling.analysis.depth_passes`` over the owned layers -- the code ``analyze_prompt`` runs
over all of them -- so no block's compute copy outlives its turn.
"""
from __future__ import annotations

import torch

from coupling.analysis.depth_passes import couple_layers, decompose_layers, holder
from coupling.analysis.steps import (PromptResult, assemble, lens_heads, token_grids,
                                     token_layers, trajectory_regularity)
from coupling.model.block_range import BlockRange
from coupling.model.trajectory import ForwardRecord
from coupling.settings.scan_settings import ScanSettings


class StageModel(BlockRange):
    """Blocks ``[lo, hi)`` (0-based) of the model ``source`` (folder or hub id), nothing else
    in memory (:class:`coupling.model.block_range.BlockRange`), and their share of a prompt."""

    # -- step 2: Jacobians and SVDs ------------------------------------------------------
    def decompose(self, record: ForwardRecord, settings: ScanSettings) -> tuple:
        """Pass 1 over the owned layers (``coupling.analysis.depth_passes.decompose_layers``):
        ``(kept, factors)``, ``factors`` = ``{t: {l: SVDResult}}`` on the CPU (``U, S, V``,
        ``s_{K+1}``, any ARPACK fall-back), the only thing that leaves the stage; ``kept`` =
        the dense Jacobians when they fit in one block's copy (else ``couple`` rebuilds them),
        which function each was taken of, the ``--deflate-ln`` records."""
        kept, factors = decompose_layers(record, self.layers, settings, self.model,
                                         holder(self, settings))
        return kept, {t: {l: s.to("cpu") for l, s in part.items()} for t, part in factors.items()}

    # -- step 3: coupling rows (+ regularity on the last stage) --------------------------
    def couple(self, record: ForwardRecord, kept: dict | None, all_factors: list,
               settings: ScanSettings) -> dict:
        """Pass 2 over the owned layers (``coupling.analysis.depth_passes.couple_layers``):
        this stage's ``depth_part``.  ``kept``: ``decompose``'s first output (None on a
        restarted actor); ``all_factors``: every stage's factors."""
        here = [{t: {l: f.to(self.device) for l, f in part.items()} for t, part in p.items()}
                for p in all_factors]
        return couple_layers(record, self.layers, kept, here, settings, self.model,
                             holder(self, settings))

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
