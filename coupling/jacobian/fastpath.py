"""Fast block Jacobians: differentiate only the tokens a Jacobian can depend on.

``J^l_{t1 t2} = d f^l(X)_{t2} / d x_{t1}`` (docs/methods.md, Eq. 8).  The reference way (the paper
authors') pushes every product through the block applied to the *whole* prompt, ``n``
tokens, although in a causal model:

* ``J_{tt}`` depends only on token ``t``'s own path through the block: the keys/values of
  the tokens ``< t`` do not depend on ``x_t`` and those of tokens ``> t`` are masked out.
  With the prefix's keys/values held fixed -- exactly the KV cache of generation -- the
  residual branch at token ``t`` is a function of ``x_t`` alone, ``g: (1, 1, d) -> (1, 1, d)``
  (:func:`token_function`), and each product costs one token instead of ``n``.
* ``J_{t1 t2}`` with ``t1 < t2`` only involves tokens ``<= t2``: the block applied to the
  truncated prompt ``X[:, :t2+1]`` gives it exactly (``t2 + 1`` tokens per product).

How it is built, generically for every Hugging Face family (GPT-2, GPT-NeoX, Llama,
Mistral, Qwen2, Gemma, Phi, Falcon...): the block's recorded call (:class:`BlockCall`) is
bound to the block's signature, the per-token arguments are indexed (attention-mask rows
and columns, ``position_ids``, ``cache_position``, rotary ``position_embeddings``, ALiBi;
:mod:`coupling.model.hf_call`), and a one-layer cache (:class:`coupling.model.kv_cache._PrefixKV`, a
``transformers.Cache``) is passed in the
block's cache argument (named as its signature says: ``cache`` in transformers >= 5.24,
``past_key_values`` / ``layer_past`` before; see
:func:`coupling.model.blocks.cache_parameter`).  The cache in *record* mode captures every
token's keys/values (post-rotary, as the attention layer caches them): during the model's
forward pass for float32 blocks (``BlockCall.kv``), else in one full-prompt replay of the
call; afterwards the cache returns ``cat(K[:t], k_new)`` from ``update`` and stores nothing,
so it cannot grow across products.

Products are batched as *token copies* (:mod:`coupling.jacobian.token_jacobian`): ``k`` products are
one block call on ``k`` copies of token ``t`` appended after the cached prefix, each copy
masked so that it sees the prefix and itself only (:meth:`FastBlock.copies_function`).

Every local function is checked once against the full prompt (``verify``); if a family does
not fit these rules it falls back, with a warning, to the truncated prompt, then to the full
prompt, so results are always those of the reference.  Non-causal blocks (BERT, ViT) use
the full prompt.

SVDs and depth-wise coupling straight from a :class:`FastBlock` (benchmarks, tests) are in
:mod:`coupling.measures.fastpath_svd`.

Conventions: ``t`` indexes tokens of the recorded prompt (negative counts from the end);
Jacobians are ``(d_out, d_in)``; products are taken in ``compute_dtype`` (float32 copies of
bf16/fp16 blocks, as :func:`coupling.model.blocks.residual_branch` does).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from coupling.jacobian.block_jacobian import exact_jacobians
from coupling.jacobian.linop import LinearOperator
from coupling.jacobian.token_jacobian import DENSE_CHUNK, LocalProblem
from coupling.model.blocks import BlockCall, cache_parameter, first_tensor, float32_block
from coupling.model.hf_call import _bind, _indexed_arguments, _Unsliceable, is_causal
from coupling.model.kv_cache import _PrefixKV

__all__ = ["VERIFY_RTOL", "FastBlock", "NotCausalError", "fast_jacobian", "fast_operator",
           "token_function"]

# Relative tolerance of the one-time check of a local function against the full prompt: far
# above round-off (some families compute softmax/RMSNorm in float32 even for float64 weights),
# far below what a wrong mask, position or cache produces (O(1e-2) and more).
VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


class NotCausalError(ValueError):
    """The block is not causal (BERT, ViT): no one-token function exists."""


# ------------------------------------------------------------------------------------------
# the fast block: local residual-branch functions of one recorded call
# ------------------------------------------------------------------------------------------
def _block_call(module, hidden_in_kwargs: bool, x, args: dict):
    return module(hidden_states=x, **args) if hidden_in_kwargs else module(x, **args)


def _minus_input(out, x, norm):
    """The residual branch from a block's output: ``norm(out) - x`` (``out - x`` without
    ``norm``)."""
    out = first_tensor(out)
    if norm is not None:
        out = norm(out)
    return out - x


def _residual_branch(module, norm, hidden_in_kwargs: bool):
    """``(x, args) -> branch``, holding the block but not its :class:`FastBlock`."""
    def f(x, args):
        return _minus_input(_block_call(module, hidden_in_kwargs, x, args), x, norm)
    return f


class FastBlock:
    """Local residual-branch functions of one recorded block call.

    ``f(X) = block(X) - X`` (or ``norm(block(X)) - X`` with ``final_norm``), in
    ``compute_dtype``.  The whole prompt's keys/values are captured once, on first use (one
    block call on ``n`` tokens); each local function is checked once against the full
    prompt when ``verify`` (one extra call on its own tokens).
    """

    def __init__(self, call: BlockCall, compute_dtype: torch.dtype = torch.float32,
                 final_norm: torch.nn.Module | None = None, verify: bool = True,
                 name: str | None = None):
        if call.input.ndim != 3 or call.input.shape[0] != 1:
            raise ValueError(f"expected a recorded call on one prompt (1, n, d), got input "
                             f"shape {tuple(call.input.shape)}")
        self.module = float32_block(call.module, compute_dtype)
        self.call = call.cast(compute_dtype)
        self.norm = float32_block(final_norm, compute_dtype) if final_norm is not None else None
        self.dtype, self.verify = compute_dtype, verify
        self.X = self.call.input.to(compute_dtype).detach()
        self.n, self.d = self.X.shape[1], self.X.shape[2]
        self.name = name or f"block {call.index + 1}"
        self.causal = is_causal(call)
        self._kv = None          # per-attention (K, V) of the whole prompt
        self._full_out = None    # f(X) on the whole prompt, for verification
        self._copies = {}        # (t, B) -> copies function
        self._broken: set[str] = set()   # local kinds that failed to bind or verify
        self.fallbacks: dict[str, str] = {}   # local kind -> why it is not used
        self._verified: set[tuple[str, int]] = set()

    # -- the local functions ---------------------------------------------------------------
    def full_function(self) -> Callable:
        """``f: (1, n, d) -> (1, n, d)`` on the whole prompt, as recorded."""
        def f(x):
            return self._finish(self.call.replay(x, self.module), x)
        return f

    def truncated_function(self, t2: int) -> Callable:
        """``f: (1, t2+1, d) -> (1, t2+1, d)``: the block on the prompt's first ``t2+1`` tokens."""
        t2 = self._token(t2)
        self._require_causal()
        _, args, _ = _bind(self.call, self.module)
        rows = range(t2 + 1)
        args = _indexed_arguments(args, self.n, rows, rows)

        def f(x):
            out = _block_call(self.module, self.call.hidden_in_kwargs, x, args)
            return self._finish(out, x)
        return f

    def copies_function(self, t: int, B: int) -> Callable:
        """``G: (1, B, d) -> (1, B, d)``: row ``i`` is the residual branch at token ``t`` when
        ``x_t`` is replaced by row ``i``, the keys/values of tokens ``< t`` held fixed.

        The ``B`` rows are copies of token ``t`` (same position, rotary angle, ALiBi bias
        and mask row) appended after the cached prefix; each attends to the prefix and to
        itself only.  Rows are independent, so ``dG`` is block diagonal with blocks ``J_tt``.
        """
        t = self._token(t)
        if (t, B) in self._copies:
            return self._copies[(t, B)]
        self._require_causal()
        _, args, cache_name = _bind(self.call, self.module)
        if cache_name is None:
            raise _Unsliceable(f"{type(self.module).__name__} takes no cache argument")
        block = ~torch.eye(B, dtype=torch.bool)                   # copies see themselves only
        block = torch.cat([torch.zeros(B, t, dtype=torch.bool), block], 1)
        args = _indexed_arguments(args, self.n, [t] * B, list(range(t)) + [t] * B,
                                  block if B > 1 else None, self.dtype, self.X.device)
        if "use_cache" in args:
            args["use_cache"] = True
        prefix = [(K[..., :t, :], V[..., :t, :]) for K, V in self._prefix_kv()]
        # G is memoised on self, so it must not refer to self: that cycle kept a bf16 block's
        # float32 copy alive until the cycle collector ran (+1.8 GB per d = 4096 block)
        branch = _residual_branch(self.module, self.norm, self.call.hidden_in_kwargs)

        def G(x):
            # a fresh cache per call: nothing is stored, nothing leaks out of vmap
            return branch(x, {**args, cache_name: _PrefixKV(prefix)})

        if len(self._copies) > 64:   # bounded memo (ARPACK reuses a few batch sizes)
            self._copies.clear()
        self._copies[(t, B)] = G
        return G

    def token_function(self, t: int) -> Callable:
        """``g: (1, 1, d) -> (1, 1, d)``: the residual branch at token ``t`` as a function of
        ``x_t`` alone, the keys/values of tokens ``< t`` held fixed (a KV cache)."""
        return self.copies_function(t, 1)

    def local(self, t1: int, t2: int) -> LocalProblem:
        """The cheapest exact :class:`LocalProblem` for ``J_{t1 t2}``."""
        t1, t2 = self._token(t1), self._token(t2)
        if not self.causal:
            return LocalProblem(self.full_function(), self.X, t1, t2, "full")
        if t1 > t2:
            return LocalProblem(self.full_function(), self.X, t1, t2, "zero")
        if t1 == t2 and "one-token" not in self._broken:
            x = self.X[:, t2:t2 + 1]
            if self._checked("one-token", t2, lambda: self.copies_function(t2, 2),
                             lambda: self._check_copies(t2)):
                return LocalProblem(self.token_function(t2), x, 0, 0, "one-token",
                                    lambda B: self.copies_function(t2, B))
        if "truncated" not in self._broken:
            if self._checked("truncated", t2, lambda: self.truncated_function(t2),
                             lambda: self._check_truncated(t2)):
                return LocalProblem(self.truncated_function(t2), self.X[:, :t2 + 1], t1, t2,
                                    "truncated")
        return LocalProblem(self.full_function(), self.X, t1, t2, "full")

    def function_used(self, t1: int = -1, t2: int = -1) -> tuple[str, str]:
        """``(kind, reason)`` of the function ``J_{t1 t2}`` is taken of: ``kind`` as in
        :class:`LocalProblem` (``"full"`` = the whole prompt), ``reason`` empty for the
        cheapest exact function, else why a longer one is used (a slowdown to report)."""
        kind = self.local(t1, t2).kind
        if kind in ("one-token", "zero"):
            return kind, ""
        if not self.causal:
            return kind, "not causal (every token sees every other): needs the whole prompt"
        if kind == "truncated" and self._token(t1) != self._token(t2):
            return kind, ""
        return kind, "; ".join(f"{k} function unusable: {why}" for k, why in self.fallbacks.items())

    # -- Jacobians -------------------------------------------------------------------------
    def operator(self, t1: int = -1, t2: int = -1, chunk: int = DENSE_CHUNK) -> LinearOperator:
        """Matrix-free ``J_{t1 t2}``: a :class:`TokenJacobian` when ``t1 == t2`` in a causal
        block, else a :class:`BlockJacobian` on the truncated (or full) prompt."""
        lp = self.local(t1, t2)
        return lp.operator(chunk, f"{self.name} at tokens (t1={self._token(t1)}, "
                                  f"t2={self._token(t2)})")

    def jacobian(self, t1: int = -1, t2: int = -1, mode: str = "vjp",
                 chunk: int = DENSE_CHUNK) -> torch.Tensor:
        """Dense ``J_{t1 t2}`` ``(d, d)`` from ``d`` products: rows ``J^T e_i`` (``mode="vjp"``,
        the default and the fastest) or columns ``J e_j`` (``"jvp"``: double backward on the
        one-token function, forward mode on the truncated/full prompt)."""
        if mode not in ("vjp", "jvp"):
            raise ValueError(f"mode must be 'vjp' or 'jvp', got {mode!r}")
        lp = self.local(t1, t2)
        if lp.kind == "zero":
            return torch.zeros(self.d, self.d, dtype=self.dtype, device=self.X.device)
        eye = torch.eye(self.d, dtype=self.dtype, device=self.X.device)
        op = lp.operator(chunk, f"{self.name} at tokens (t1={self._token(t1)}, "
                                f"t2={self._token(t2)})")
        return op.rmatmat(eye).T if mode == "vjp" else op @ eye

    def jacobians(self, t2: int = -1, t1s: Sequence[int] | None = None,
                  chunk: int = 64) -> torch.Tensor:
        """Dense ``J_{t1 t2}`` for all ``t1`` in ``t1s`` (default all): ``(len(t1s), d, d)``.

        Like :func:`coupling.jacobian.block_jacobian.exact_jacobians` (one VJP sweep at output ``t2``), on
        the truncated prompt ``X[:, :t2+1]``; entries with ``t1 > t2`` of a causal block are 0.
        """
        t2 = self._token(t2)
        t1s = list(range(self.n)) if t1s is None else [self._token(t) for t in t1s]
        out = torch.zeros(len(t1s), self.d, self.d, dtype=self.dtype, device=self.X.device)
        reach = [i for i, t in enumerate(t1s) if t <= t2 or not self.causal]
        if reach:
            lp = self.local(0, t2) if self.causal else self.local(t2, t2)
            rows = [t1s[i] for i in reach]
            out[reach] = exact_jacobians(lp.fn, lp.x, lp.row_out, rows, chunk, self.name)
        return out

    # -- internals -------------------------------------------------------------------------
    def _finish(self, out, x):
        return _minus_input(out, x, self.norm)

    def _token(self, t: int) -> int:
        if not isinstance(t, int) or isinstance(t, bool):
            raise ValueError(f"token index must be an int, got {t!r}")
        if not -self.n <= t < self.n:
            raise ValueError(f"token index {t} out of range for a prompt of {self.n} tokens")
        return t % self.n

    def _require_causal(self):
        if not self.causal:
            raise NotCausalError(
                f"{self.name} ({type(self.module).__name__}) is not causal: token t sees later "
                "tokens, so J_tt needs the whole prompt; use FastBlock.local/operator/jacobian, "
                "which fall back to the full-prompt function")

    @torch.no_grad()
    def _prefix_kv(self):
        """Every attention's (K, V) of the whole prompt: as the forward pass recorded them
        (``BlockCall.kv``, in the compute dtype), else from one replay of the call with a
        recording cache (:meth:`BlockCall.replay`)."""
        if self._kv is None:
            if self.call.kv is None:
                if cache_parameter(self.module) is None:
                    raise _Unsliceable(f"{type(self.module).__name__} takes no cache argument")
                out = self.call.replay(self.X, self.module, kv_cache=_PrefixKV)
                if self.call.kv is None:
                    raise _Unsliceable(f"{type(self.module).__name__} never used its cache")
            else:
                out = self.call.output.to(self.dtype)
            self._kv = self.call.kv
            self._full_out = self._finish(out, self.X)
        return self._kv

    @torch.no_grad()
    def _reference(self) -> torch.Tensor:
        if self._full_out is None:
            self._full_out = self.full_function()(self.X)
        return self._full_out

    @torch.no_grad()
    def _check_copies(self, t: int) -> float:
        """Largest relative error of the one-token (B = 1) and two-copy functions."""
        want = self._reference()[:, t:t + 1]
        x = self.X[:, t:t + 1]
        errs = [_rel(self.copies_function(t, 1)(x), want),
                _rel(self.copies_function(t, 2)(x.expand(1, 2, self.d)), want.expand(1, 2, -1))]
        return max(errs)

    @torch.no_grad()
    def _check_truncated(self, t2: int) -> float:
        return _rel(self.truncated_function(t2)(self.X[:, :t2 + 1]),
                    self._reference()[:, :t2 + 1])

    def _checked(self, kind: str, t: int, build: Callable, check: Callable[[], float]) -> bool:
        """Whether the ``kind`` function at token ``t`` builds and (when ``verify``) matches
        the full prompt; checked once per (kind, t)."""
        if (kind, t) in self._verified:
            return True
        try:
            build()
            err = check() if self.verify else 0.0
            tol = VERIFY_RTOL.get(self.dtype, 1e-2)
            if err <= tol:
                self._verified.add((kind, t))
                return True
            reason = f"differs from the full prompt by {err:.2e} (relative, tol {tol:.0e})"
        except (_Unsliceable, TypeError, ValueError, RuntimeError, AttributeError,
                IndexError) as e:
            reason = f"{type(e).__name__}: {e}"
        self._broken.add(kind)
        self.fallbacks[kind] = reason
        warnings.warn(f"{self.name} ({type(self.module).__name__}): the {kind} function is not "
                      f"usable ({reason}); falling back to a longer prompt (slower, still exact)",
                      RuntimeWarning, stacklevel=3)
        return False


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} instead of {tuple(want.shape)}")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------
# module-level API
# ------------------------------------------------------------------------------------------
def token_function(call: BlockCall, t: int, compute_dtype: torch.dtype = torch.float32,
                   final_norm: torch.nn.Module | None = None) -> Callable:
    """``g(x: (1, 1, d)) -> (1, 1, d)``: residual branch at token ``t`` with only ``x_t`` free.

    Raises :class:`NotCausalError` for non-causal blocks and ``ValueError`` for blocks that
    cannot be called on one token with a cache.  Not verified (use :class:`FastBlock` or
    :func:`fast_operator` for the checked version that falls back to longer prompts).
    """
    try:
        return FastBlock(call, compute_dtype, final_norm, verify=False).token_function(t)
    except _Unsliceable as e:
        raise ValueError(f"block {call.index + 1} ({type(call.module).__name__}) cannot be "
                         f"called on one token with its prefix cached: {e}; use "
                         "FastBlock(call).operator(t, t), which falls back to the truncated "
                         "prompt") from None


def fast_operator(call: BlockCall, t1: int = -1, t2: int = -1, *,
                  compute_dtype: torch.dtype = torch.float32, final_norm=None,
                  chunk: int = DENSE_CHUNK) -> LinearOperator:
    """Matrix-free ``J_{t1 t2}`` whose products touch only the tokens it depends on."""
    return FastBlock(call, compute_dtype, final_norm).operator(t1, t2, chunk)


def fast_jacobian(call: BlockCall, t: int = -1, method: str = "vjp", *, t1: int | None = None,
                  compute_dtype: torch.dtype = torch.float32, final_norm=None,
                  chunk: int = DENSE_CHUNK) -> torch.Tensor:
    """Dense ``J_{t1 t}`` ``(d, d)`` (``t1`` defaults to ``t``) from ``d`` one-token products:
    rows by VJP (``method="vjp"``) or columns (``"jvp"``); see :meth:`FastBlock.jacobian`."""
    fb = FastBlock(call, compute_dtype, final_norm)
    return fb.jacobian(t if t1 is None else t1, t, mode=method, chunk=chunk)
