"""The per-prompt analysis settings: :class:`ScanSettings`, checked once when built.

Fields, defaults and help come from the ``analysis`` group of :mod:`coupling.settings.schema`
(listed there once); this class adds the checks that need the library (SVD method names,
last-block conventions) and the products-per-batch default.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict

from coupling.model.trajectory import LAST_BLOCKS, check_last_block
from coupling.settings.schema import (JACOBIAN_FUNCTIONS, MEASURES, parse_token_layers,
                                      settings_dataclass)
from coupling.spectrum.svd import resolve_method

# Products per batch.  One-token products are cheap and batch well up to ~128
# (BENCHMARKS.md); a product on many tokens holds their activations, so fewer at once.
DEFAULT_CHUNK = {"one-token": 128, "tokens": 64}


@settings_dataclass("analysis")
class ScanSettings:
    """Knobs of the per-prompt analysis: the ``analysis`` settings of
    :mod:`coupling.settings.schema` (fields, defaults and help are listed there, once)."""

    def __post_init__(self):
        if isinstance(self.measures, str):
            self.measures = tuple(m.strip() for m in self.measures.split(",") if m.strip())
        self.measures = tuple(self.measures)
        bad = [m for m in self.measures if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown measure(s) {bad}: use a comma list of {', '.join(MEASURES)}")
        if self.token not in ("last", "all"):
            raise ValueError(f"--token must be 'last' or 'all', got {self.token!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"--k must be a positive integer, got {self.k!r}")
        resolve_method(self.svd, 10**6)  # validates the name
        if self.jacobian not in JACOBIAN_FUNCTIONS:
            raise ValueError(f"--jacobian must be one of {', '.join(JACOBIAN_FUNCTIONS)}, "
                             f"got {self.jacobian!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"--chunk must be a positive integer, got {self.chunk!r}")
        if self.arpack_maxiter is not None and (not isinstance(self.arpack_maxiter, int)
                                                or self.arpack_maxiter < 1):
            raise ValueError(f"arpack_maxiter must be a positive integer, got {self.arpack_maxiter!r}")
        if self.token_layers is not None:
            self.token_layers = parse_token_layers(self.token_layers)
        self._resolve_last_block()

    def _resolve_last_block(self):
        """Validate ``last_block``; map the deprecated ``final_norm_in_last`` onto it."""
        check_last_block(self.last_block)
        if self.final_norm_in_last is None:
            return
        alias = LAST_BLOCKS[0] if self.final_norm_in_last else "raw"
        if self.last_block != LAST_BLOCKS[0] and self.last_block != alias:
            raise ValueError(f"final_norm_in_last={self.final_norm_in_last} contradicts "
                             f"last_block={self.last_block!r}: drop final_norm_in_last")
        warnings.warn(f"final_norm_in_last is deprecated: use last_block: {alias}",
                      DeprecationWarning, stacklevel=3)
        self.last_block, self.final_norm_in_last = alias, None

    def products_per_batch(self, one_token: bool) -> int:
        """``chunk``, or its default for one-token products / products on many tokens."""
        return self.chunk or DEFAULT_CHUNK["one-token" if one_token else "tokens"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("final_norm_in_last")       # always resolved into last_block
        return d
