"""coupling: transformer block coupling and trajectory regularity (Aubry et al.).

Quick API::

    import coupling
    lm = coupling.load_model()                      # embedded tiny GPT (or a hub id / folder)
    rec = coupling.run_forward(lm, lm.tokenizer("What is the capital of France? The capital is",
                                                 return_tensors="pt")["input_ids"])
    J = coupling.block_jacobian(rec, layer=3)       # matrix-free J^l_{tt} at the last token
    svd = coupling.top_k_svd(J, k=10)
"""
import importlib

# Public names -> the module that defines them.  Imported on first use (PEP 562), so that
# `import coupling` (and `coupling --help`) costs nothing until torch is really needed.
_LAZY = {
    "find_blocks": "model.blocks", "residual_branch": "model.blocks",
    "BlockJacobian": "jacobian.block_jacobian", "NonFiniteJacobianError": "jacobian.block_jacobian",
    "exact_jacobian": "jacobian.block_jacobian", "exact_jacobians": "jacobian.block_jacobian",
    "DenseOperator": "jacobian.linop", "LinearOperator": "jacobian.linop",
    "as_operator": "jacobian.linop",
    "LoadedModel": "model.loading", "ModelLoadError": "errors",
    "load_model": "model.loading",
    "SVDResult": "spectrum.svd", "randomized_svd": "spectrum.svd", "top_k_svd": "spectrum.svd",
    "ForwardRecord": "model.trajectory", "logit_lens_head": "model.trajectory",
    "run_forward": "model.trajectory", "trajectories": "model.trajectory",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"


def block_jacobian(record, layer: int, t1: int = -1, t2: int = -1,
                   final_norm=None, chunk: int = 128, jacobian: str = "local"):
    """Matrix-free ``J^l_{t1 t2}`` of block ``layer`` (1-based, as in the paper) of a recorded prompt.

    ``jacobian="local"`` (default): products touch only the tokens ``J`` depends on (one token
    with its prefix's keys/values fixed for ``t1 == t2`` in a causal model; ``coupling.jacobian.fastpath``);
    ``"full"``: every product goes through the block on the whole prompt.  Same values.
    The last block includes the final norm when the record's ``X^L`` does (``last_block``).
    """
    if not 1 <= layer <= record.n_layers:
        raise ValueError(f"layer {layer} out of range 1..{record.n_layers}")
    if jacobian not in ("local", "full"):
        raise ValueError(f"jacobian must be 'local' or 'full', got {jacobian!r}")
    call = record.calls[layer - 1]
    if final_norm is None and layer == record.n_layers:
        final_norm = record.final_norm   # F^L as X^L has it (Eq. 7 unless run_forward(raw))
    if jacobian == "local":
        from coupling.jacobian.fastpath import FastBlock
        fb = FastBlock(call, final_norm=final_norm, name=f"layer {layer}")
        return fb.operator(t1, t2, chunk)
    from coupling.jacobian.block_jacobian import BlockJacobian
    from coupling.model.blocks import residual_branch
    f = residual_branch(call, final_norm=final_norm)
    return BlockJacobian(f, call.input.float(), t1, t2, chunk=chunk, name=f"layer {layer}")


__all__ = sorted([*_LAZY, "block_jacobian"])


def __dir__():
    return __all__
