"""coupling: transformer block coupling and trajectory regularity (Aubry et al.).

Quick API::

    import coupling
    lm = coupling.load_model()                      # embedded tiny GPT (or a hub id / folder)
    rec = coupling.run_forward(lm, lm.tokenizer("What is the capital of France? The capital is",
                                                 return_tensors="pt")["input_ids"])
    J = coupling.block_jacobian(rec, layer=3)       # matrix-free J^l_{tt} at the last token
    svd = coupling.top_k_svd(J, k=10)
"""
from .blocks import find_blocks, residual_branch
from .jacobian import BlockJacobian, NonFiniteJacobianError, exact_jacobian, exact_jacobians
from .linop import DenseOperator, LinearOperator, as_operator
from .loading import LoadedModel, ModelLoadError, load_model
from .svd import SVDResult, randomized_svd, top_k_svd
from .trajectory import ForwardRecord, logit_lens_head, run_forward, trajectories

__version__ = "0.1.0"


def block_jacobian(record: ForwardRecord, layer: int, t1: int = -1, t2: int = -1,
                   final_norm=None, chunk: int = 128, jacobian: str = "local") -> LinearOperator:
    """Matrix-free ``J^l_{t1 t2}`` of block ``layer`` (1-based, as in the paper) of a recorded prompt.

    ``jacobian="local"`` (default): products touch only the tokens ``J`` depends on (one token
    with its prefix's keys/values fixed for ``t1 == t2`` in a causal model; ``coupling.fastpath``);
    ``"full"``: every product goes through the block on the whole prompt.  Same values.
    """
    if not 1 <= layer <= record.n_layers:
        raise ValueError(f"layer {layer} out of range 1..{record.n_layers}")
    if jacobian not in ("local", "full"):
        raise ValueError(f"jacobian must be 'local' or 'full', got {jacobian!r}")
    call = record.calls[layer - 1]
    if jacobian == "local":
        from .fastpath import FastBlock
        fb = FastBlock(call, final_norm=final_norm, name=f"layer {layer}")
        return fb.operator(t1, t2, chunk)
    f = residual_branch(call, final_norm=final_norm)
    return BlockJacobian(f, call.input.float(), t1, t2, chunk=chunk, name=f"layer {layer}")


__all__ = [
    "BlockJacobian", "DenseOperator", "ForwardRecord", "LinearOperator", "LoadedModel",
    "ModelLoadError", "NonFiniteJacobianError", "SVDResult", "as_operator", "block_jacobian",
    "exact_jacobian", "exact_jacobians", "find_blocks", "load_model", "logit_lens_head",
    "randomized_svd", "residual_branch", "run_forward", "top_k_svd", "trajectories",
]
