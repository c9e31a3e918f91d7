"""The one-layer KV cache that holds a prompt's prefix fixed (:mod:`coupling.jacobian.fastpath`).

One full-prompt block call with the cache in *record* mode captures every token's keys/values
(post-rotary, as the attention layer caches them); afterwards, in *frozen* mode, the cache
returns ``cat(K[:t], k_new)`` from ``update`` and stores nothing, so it cannot grow across
products.
"""
from __future__ import annotations

import torch

from coupling.model.hf_call import _Unsliceable

try:  # a real Cache subclass, so families that type-check the cache accept it
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # pragma: no cover - transformers is a dependency
    _CacheBase = object


class _PrefixKV(_CacheBase):
    """A one-layer KV cache for one block call (``layer_idx`` is ignored).

    ``prefix=None`` (record mode): ``update`` stores the keys/values it is given and returns
    them unchanged, so the block computes exactly as without a cache.  ``prefix=[(K, V),
    ...]`` (frozen mode): the i-th ``update`` of the call returns ``cat(K_i, k)``, ``cat(V_i,
    v)`` along the sequence axis and stores nothing.  One entry per attention in the block.
    """

    def __init__(self, prefix=None):
        if _CacheBase is not object:
            super().__init__(layers=[])
        self.prefix = prefix
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._i = 0

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if self.prefix is None:
            self.recorded.append((key_states.detach(), value_states.detach()))
            return key_states, value_states
        if self._i >= len(self.prefix):
            raise _Unsliceable("the block updated its cache more often than when recorded")
        K, V = self.prefix[self._i]
        self._i += 1
        return torch.cat([K, key_states], dim=-2), torch.cat([V, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if not self.prefix else self.prefix[0][0].shape[-2]

