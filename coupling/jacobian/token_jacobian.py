"""The matrix-free Jacobian of a local function: :class:`LocalProblem` and :class:`TokenJacobian`.

:class:`coupling.jacobian.fastpath.FastBlock` finds, for each ``J_{t1 t2}``, the smallest function of
a block that gives it exactly (a :class:`LocalProblem`: one token with its prefix's
keys/values fixed, the truncated prompt, or the whole prompt); this module turns that
function into a :class:`~coupling.jacobian.linop.LinearOperator`.

Products of the one-token function are batched as *token copies*, not with ``vmap``: ``k``
products are one block call on ``k`` copies of token ``t`` appended after the cached prefix
(same position, rotary angle and mask row), each copy masked so that it sees the prefix and
itself only (:meth:`coupling.jacobian.fastpath.FastBlock.copies_function`).  The prefix keys/values
are then shared by the ``k`` products.  Under ``vmap`` over the one-token function (which
also works) the backward pass materialises the gradient of the whole concatenated ``K``/``V``
per product, which costs more than the one-token product itself at ``n = 64``
(BENCHMARKS.md, ``dense-vmap``).  Longer local functions use
:class:`coupling.jacobian.block_jacobian.BlockJacobian`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import vjp

from coupling.jacobian.block_jacobian import BlockJacobian, check_finite
from coupling.jacobian.linop import LinearOperator

# Products per batch of token copies.  Measured on CPU (BENCHMARKS.md): 64-256 copies make the
# block's matmuls efficient; larger batches only add attention work among the masked copies.
DENSE_CHUNK = 128


@dataclass
class LocalProblem:
    """The smallest function giving ``J_{t1 t2}`` exactly.

    ``fn: (1, m, d) -> (1, m, d)`` residual branch on ``m`` tokens, evaluated at ``x``
    ``(1, m, d)``; ``J_{t1 t2} = d fn(x)[0, row_out] / d x[0, row_in]``.  ``kind`` is
    ``"one-token"`` (m = 1, prefix K/V fixed), ``"truncated"`` (m = t2 + 1), ``"full"``
    (m = n: non-causal blocks, or the fallback) or ``"zero"`` (t1 > t2 in a causal block).
    For ``"one-token"``, ``copies(B)`` is the same function on ``B`` independent copies of
    the token, ``(1, B, d) -> (1, B, d)``, used to batch products without ``vmap``.
    """

    fn: Callable
    x: torch.Tensor
    row_in: int
    row_out: int
    kind: str
    copies: Callable[[int], Callable] | None = None

    @property
    def tokens(self) -> int:
        """Tokens pushed through the block per product."""
        return self.x.shape[1]

    def operator(self, chunk: int = DENSE_CHUNK, name: str = "block") -> LinearOperator:
        """``TokenJacobian`` (one-token kind) or a ``BlockJacobian`` on ``fn``."""
        if self.copies is not None:
            return TokenJacobian(self.copies, self.x, chunk=chunk, name=name)
        return BlockJacobian(self.fn, self.x, self.row_in, self.row_out, chunk=chunk, name=name)


class TokenJacobian(LinearOperator):
    """Matrix-free ``J_{tt}`` from the one-token function, products batched as token copies.

    ``k`` products are ONE call of the block on ``k`` copies of token ``t`` (each sees the
    prefix keys/values and itself, not the other copies): ``J.T @ M`` is a reverse-mode
    ``vjp`` (the forward is kept and reused while ``k`` does not change), ``J @ M`` the
    reverse-mode derivative of that linear map (double backward).  Unlike ``vmap`` over the
    one-token function, the prefix keys/values are shared by all products instead of being
    broadcast (and their gradients materialised) per product.
    """

    transpose_is_cheaper = True    # a VJP against a double backward: 3-4x (bench_routes.py)

    def __init__(self, copies: Callable[[int], Callable], x: torch.Tensor,
                 chunk: int = DENSE_CHUNK, name: str = "block"):
        self.copies, self.x = copies, x.detach().reshape(1, 1, -1)
        d = self.x.shape[-1]
        self.shape, self.dtype, self.device = (d, d), x.dtype, x.device
        self.chunk, self.name = int(chunk), name
        self.n_products = 0
        self._pull = (0, None)   # (k, vjp function) of the last reverse-mode batch size

    def _xb(self, k: int) -> torch.Tensor:
        return self.x.expand(1, k, self.x.shape[-1]).contiguous()

    def _pullback(self, k: int):
        """The VJP function of ``k`` copies (the forward is done once per batch size)."""
        if self._pull[0] != k:     # ARPACK calls with the same k again and again
            self._pull = (k, vjp(self.copies(k), self._xb(k))[1])
        return self._pull[1]

    def _matmat(self, M):
        # J @ M as the derivative of the (linear) map u -> J^T u: reverse over reverse.
        # Measured 1.5-3x cheaper than forward mode (torch.func.jvp) through HF blocks.
        outs = []
        for s in range(0, M.shape[1], self.chunk):
            T = M[:, s:s + self.chunk].T.contiguous()[None]          # (1, k, d)
            k = T.shape[1]
            pull = self._pullback(k)
            zero = torch.zeros_like(T)
            _, pull2 = vjp(lambda u: pull(u)[0], zero)
            outs.append(pull2(T)[0][0].T)
            self.n_products += k
        return check_finite(torch.cat(outs, 1), self._what())

    def _rmatmat(self, M):
        outs = []
        for s in range(0, M.shape[1], self.chunk):
            C = M[:, s:s + self.chunk].T.contiguous()[None]
            k = C.shape[1]
            outs.append(self._pullback(k)(C)[0][0].T)
            self.n_products += k
        return check_finite(torch.cat(outs, 1), self._what())

    def _what(self) -> str:
        return f"the Jacobian of {self.name}"
