"""Regularity of hidden-state trajectories (docs/methods.md, "Trajectory regularity"; Eq. 15-18).

Input convention: a trajectory tensor ``X`` (torch or numpy) of shape ``(L+1, n, d)``
(layer 0 = embeddings, ``n`` tokens) or ``(L+1, d)`` for one token.  Per-token scores come
back as a float for ``(L+1, d)`` and as a float64 array ``(n,)`` for ``(L+1, n, d)``;
per-layer curves as ``(L+1, n)`` / ``(L, n)`` (or without the token axis).  All
arithmetic is float64 numpy.

Definitions (token ``i`` dropped):

* line-shape score ``LSS = L / ||x~^L - x~^0||`` with ``x~^0 = x^0``,
  ``x~^l = x~^{l-1} + (x^l - x^{l-1}) / ||x^l - x^{l-1}||``: ``>= 1``, ``= 1`` iff straight;
* expodistance ``ED = Var_l(a^l) / (Mean_l a^l)^2`` with ``a^l = ln(||x^l|| / ||x^{l-1}||)``
  (population variance, ``l = 1..L``): 0 for exactly exponential norms;
* equidistance CV = ``std_l / mean_l`` of the step lengths ``||x^l - x^{l-1}||``
  (population std): 0 for equal steps.

Degenerate input is an error, never a silent inf/nan: a zero step (``x^l = x^{l-1}``, the
unit step of LSS is undefined) raises ``ValueError`` in the LSS functions, a zero-norm
state raises in :func:`expodistance`, all-zero steps raise in :func:`equidistance_cv`.
Only mathematically infinite values pass through: LSS is ``inf`` when the unit steps
cancel exactly (e.g. a trajectory that goes back and forth along one line), ED is ``inf``
when the mean growth rate is exactly 0.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch


def _traj(X, name: str = "X") -> tuple[np.ndarray, bool]:
    """``X`` as float64 ``(L+1, n, d)`` plus whether a single ``(L+1, d)`` was given."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim not in (2, 3):
        raise ValueError(f"{name} must be a trajectory (L+1, n, d) or (L+1, d), got shape {X.shape}")
    if X.shape[0] < 2:
        raise ValueError(f"{name} has {X.shape[0]} state(s); a trajectory needs L+1 >= 2 layers")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} has non-finite entries")
    single = X.ndim == 2
    return (X[:, None, :] if single else X), single


def _out(values: np.ndarray, single: bool):
    """Drop the token axis (last) for a single-token trajectory; 0-d -> float."""
    v = values[..., 0] if single else values
    return float(v) if np.ndim(v) == 0 else v


def _unit_steps(X: np.ndarray) -> np.ndarray:
    """Unit step directions ``(L, n, d)``; raises on a zero step."""
    steps = np.diff(X, axis=0)
    lengths = np.linalg.norm(steps, axis=-1)
    zero = np.argwhere(lengths == 0)
    if zero.size:
        l, i = zero[0]
        raise ValueError(f"zero step: x^{l + 1} == x^{l} for token {i} ({len(zero)} such steps); "
                         "the line-shape score needs a direction at every step - drop repeated "
                         "layers from the trajectory first")
    return steps / lengths[..., None]


def layer_norms(X):
    """``||x_i^l||`` for every layer and token: ``(L+1, n)`` (or ``(L+1,)``)."""
    X, single = _traj(X)
    return _out(np.linalg.norm(X, axis=-1), single)


def step_sizes(X):
    """Step lengths ``||x_i^l - x_i^{l-1}||``, ``l = 1..L``: ``(L, n)`` (or ``(L,)``).

    Row ``l-1`` is the step into layer ``l``.  Averaging over tokens gives the per-layer
    "mean equidistance" curve of Fig. 24.
    """
    X, single = _traj(X)
    return _out(np.linalg.norm(np.diff(X, axis=0), axis=-1), single)


def line_shape_score(traj):
    """LSS (Eq. 15-16) of each token's whole trajectory: float, or ``(n,)``."""
    X, single = _traj(traj, "traj")
    unit = _unit_steps(X)
    with np.errstate(divide="ignore"):
        lss = unit.shape[0] / np.linalg.norm(unit.sum(axis=0), axis=-1)
    return _out(lss, single)


def windowed_lss(traj, width: int = 11, edge: str = "nan"):
    """LSS on a centred window of ``width`` hidden states, per layer (Fig. 24-25).

    Value at layer ``c`` = LSS of ``x^{c-h} .. x^{c+h}`` with ``h = width // 2`` (``width``
    odd >= 3, i.e. ``width - 1`` steps).  Edge handling: ``edge="nan"`` (default) gives nan
    where the window does not fit in ``0..L``; ``edge="truncate"`` clips the window to
    ``0..L`` (fewer steps near the ends, so values there are not comparable with the
    middle).  Returns ``(L+1,)`` for one token or ``(L+1, n)``.
    """
    if not isinstance(width, (int, np.integer)) or width < 3 or width % 2 == 0:
        raise ValueError(f"width must be an odd integer >= 3 (states in the window), got {width!r}")
    if edge not in ("nan", "truncate"):
        raise ValueError(f"edge must be 'nan' or 'truncate', got {edge!r}")
    X, single = _traj(traj, "traj")
    L = X.shape[0] - 1
    if edge == "nan" and width > L + 1:
        raise ValueError(f"width {width} exceeds the {L + 1} states of the trajectory: every "
                         "value would be nan; use a smaller width or edge='truncate'")
    unit = _unit_steps(X)
    # C[j] = sum of the first j unit steps, so steps lo+1..hi sum to C[hi] - C[lo].
    C = np.concatenate([np.zeros_like(unit[:1]), np.cumsum(unit, axis=0)])
    h = width // 2
    out = np.full((L + 1, X.shape[1]), np.nan)
    for c in range(L + 1):
        lo, hi = c - h, c + h
        if edge == "nan" and (lo < 0 or hi > L):
            continue
        lo, hi = max(lo, 0), min(hi, L)
        with np.errstate(divide="ignore"):
            out[c] = (hi - lo) / np.linalg.norm(C[hi] - C[lo], axis=-1)
    return _out(out, single)


def log_growth_rates(traj):
    """``a^l = ln(||x^l|| / ||x^{l-1}||)``, ``l = 1..L``: ``(L, n)`` (or ``(L,)``)."""
    X, single = _traj(traj, "traj")
    norms = np.linalg.norm(X, axis=-1)
    zero = np.argwhere(norms == 0)
    if zero.size:
        l, i = zero[0]
        raise ValueError(f"hidden state x^{l} of token {i} is the zero vector: its log-norm "
                         "growth rate is undefined")
    return _out(np.diff(np.log(norms), axis=0), single)


def expodistance(traj):
    """Expodistance ED (Eq. 17-18): ``Var_l(a^l) / Mean_l(a^l)^2``: float or ``(n,)``.

    Population variance over ``l = 1..L``; ``inf`` if the mean growth rate is exactly 0.
    """
    a = np.asarray(log_growth_rates(traj))
    with np.errstate(divide="ignore", invalid="ignore"):
        ed = a.var(axis=0) / a.mean(axis=0) ** 2
    return float(ed) if np.ndim(ed) == 0 else ed


def equidistance_cv(traj):
    """Coefficient of variation of the step lengths over ``l`` (Fig. 23): float or ``(n,)``.

    ``std / mean`` with the population std; raises if a token never moves.
    """
    s = np.asarray(step_sizes(traj))
    mean = s.mean(axis=0)
    if np.any(mean == 0):
        raise ValueError("a token's trajectory never moves (all steps zero): its equidistance "
                         "coefficient of variation is undefined")
    cv = s.std(axis=0) / mean
    return float(cv) if np.ndim(cv) == 0 else cv


# The lens streams the unembedding (:class:`LinearLens`): LENS_ROWS hidden states at a time,
# LENS_VOCAB of its rows at a time, with a running log-sum-exp.  Its (V, d) matrix is then read
# once per LENS_ROWS states instead of once per layer, and the logits never exist whole: 2x
# faster than a layer at a time at d = 768, V = 50257, n = 71 (BENCHMARKS.md, whole process),
# with LENS_ROWS x LENS_VOCAB x 20 bytes of work (42 MB) whatever n, L and V are.
LENS_ROWS, LENS_VOCAB = 1024, 2048
_LENS_BYTES_PER_LOGIT = 20      # float32 logits, their float64 copy, its exponential
_MASKED = -1e300


class LinearLens(NamedTuple):
    """A logit lens that is an optional map (the final norm) then a linear unembedding:
    ``logits = norm(h) @ weight.T + bias``, computed in ``weight``'s dtype.  Callable as a
    head (``(n, d) -> (n, V)`` float32 logits); :func:`logit_lens_entropy` streams it."""

    weight: torch.Tensor                  # (V, d)
    bias: torch.Tensor | None = None      # (V,)
    norm: Callable | None = None

    def states(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` as the unembedding takes it: in its dtype, after ``norm``."""
        h = h.to(self.weight.dtype)
        return self.norm(h) if self.norm is not None else h

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.states(h), self.weight, self.bias).float()


def lens_work_bytes(n: int, layers: int, d: int, vocab: int, streamed: bool = True) -> int:
    """Bytes :func:`logit_lens_entropy` works in beside the trajectory of ``layers`` states
    of ``n`` tokens: a streamed :class:`LinearLens` (a chunk of states and its logits against
    a chunk of a ``vocab``-word unembedding), or (``streamed=False``, any other head) one
    layer's logits whole."""
    if not streamed:
        return n * vocab * 28          # float32 logits, float64 log p, p, p log p
    rows = min(layers * n, LENS_ROWS)
    return rows * (min(vocab, LENS_VOCAB) * _LENS_BYTES_PER_LOGIT + 4 * d)


@torch.no_grad()
def logit_lens_entropy(X, head: Callable, last_head: Callable | None = None,
                       rows: int = LENS_ROWS, vocab: int = LENS_VOCAB):
    """Entropy (nats) of the softmax of ``head(X^l)`` for every layer: ``(L+1, n)``.

    ``head`` maps ``(n, d)`` hidden states (a torch tensor; numpy input is converted with
    ``torch.from_numpy``, dtype kept) to ``(n, V)`` logits: the caller supplies final norm
    + unembedding.  Hugging Face's last hidden state already has the final norm applied;
    pass ``last_head`` (e.g. the unembedding alone) to use a different map for ``X^L``.
    Single-token ``(L+1, d)`` input gives ``(L+1,)``.  When every head is a
    :class:`LinearLens` of one unembedding, ``rows`` states and ``vocab`` words at a time
    (the same entropies, float64 throughout after the float32 logits).
    """
    X = torch.from_numpy(X) if isinstance(X, np.ndarray) else X
    if not isinstance(X, torch.Tensor) or X.ndim not in (2, 3):
        raise ValueError(f"X must be a trajectory (L+1, n, d) or (L+1, d), got "
                         f"{getattr(X, 'shape', type(X).__name__)}")
    single = X.ndim == 2
    X = X[:, None, :] if single else X
    heads = [last_head if (last_head is not None and l == X.shape[0] - 1) else head
             for l in range(X.shape[0])]
    if _one_linear_lens(heads):
        out = _streamed_entropy(X, heads, rows, vocab)
    else:
        out = np.empty((X.shape[0], X.shape[1]))
        for l, fn in enumerate(heads):
            out[l] = _entropy_of_logits(torch.as_tensor(fn(X[l])), X.shape[1])
    return out[:, 0] if single else out


def _one_linear_lens(heads) -> bool:
    first = heads[0]
    return all(isinstance(h, LinearLens) and h.weight is first.weight and h.bias is first.bias
               for h in heads)


def _entropy_of_logits(logits: torch.Tensor, n: int) -> np.ndarray:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(f"head must map (n, d) states to (n, V) logits; got shape "
                         f"{tuple(logits.shape)} for n={n}")
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    # 0 log 0 = 0: logits of -inf (masked vocabulary) contribute nothing.  p and log p
    # are taken once each (xlogy(p, p) took a second log: ~40% of this loop's time)
    return (-(p * logp).masked_fill_(p == 0, 0.0).sum(-1)).cpu().numpy()


def _streamed_entropy(X: torch.Tensor, heads: list, rows: int, vocab: int) -> np.ndarray:
    """Every layer's entropies, ``rows`` of the flattened ``(layer, token)`` states at a time."""
    layers, n = X.shape[0], X.shape[1]
    weight, bias = heads[0].weight, heads[0].bias
    out = np.empty(layers * n)
    for a in range(0, layers * n, rows):
        b = min(a + rows, layers * n)
        states = [heads[l].states(X[l, max(a - l * n, 0):min(b - l * n, n)])
                  for l in range(a // n, (b - 1) // n + 1)]
        out[a:b] = _linear_entropy(torch.cat(states), weight, bias, vocab).cpu().numpy()
    return out.reshape(layers, n)


def _linear_entropy(x, weight, bias, vocab: int) -> torch.Tensor:
    """Entropy of ``softmax(x @ weight.T + bias)`` per row, ``vocab`` words at a time:
    ``H = logsumexp(z) - E_p[z]`` from a running maximum ``m``, ``s = sum exp(z - m)`` and
    ``t = sum exp(z - m) z``, all float64."""
    f64 = dict(dtype=torch.float64, device=x.device)
    m = torch.full((x.shape[0],), -torch.inf, **f64)
    s, t = torch.zeros(x.shape[0], **f64), torch.zeros(x.shape[0], **f64)
    for c in range(0, weight.shape[0], vocab):
        z = torch.nn.functional.linear(x, weight[c:c + vocab],
                                       None if bias is None else bias[c:c + vocab])
        # a logit of -inf (masked vocabulary) becomes -1e300, below every float32 but far
        # from float64's overflow: its exponential is 0 next to any real logit and 0 * z = 0
        # (0 log 0 = 0) where -inf would give nan; a chunk of them sums to no worse than -1e303
        z = z.double().clamp_(min=_MASKED)
        new = torch.maximum(m, z.amax(1))
        scale = torch.exp(m - new)
        s.mul_(scale)
        t.mul_(scale)
        m = new
        e = (z - new[:, None]).exp_()
        s += e.sum(1)
        t += e.mul_(z).sum(1)
    return m + torch.log(s) - t / s


class PCAResult(NamedTuple):
    """``projections (L', n, k)``; ``explained_variance_ratio (k,)`` of the fitted states;
    ``components (k, d)`` (unit rows); ``mean (d,)`` subtracted before projecting."""

    projections: np.ndarray
    explained_variance_ratio: np.ndarray
    components: np.ndarray
    mean: np.ndarray


def pca_projection(X, n_components: int = 2, fit_on="last", layers=None) -> PCAResult:
    """Project every ``x_i^l`` on a PCA basis fitted to one layer's states (App. A.2.1).

    ``layers``: ``None`` (all ``0..L``), a ``slice`` or a sequence of layer indices; the
    shallow/deep panels use a range.  ``fit_on``: ``"last"`` (default, the paper: the last
    selected layer's n states), ``"all"`` (every selected state) or an int (position
    within the selected layers).  Component signs are fixed so each component's largest
    entry is positive.  ``(L+1, d)`` single-token input gives ``(L', k)`` projections and
    needs ``fit_on="all"``.
    """
    Xa, single = _traj(X)
    if layers is not None:
        Xa = Xa[layers]
        if Xa.ndim != 3 or Xa.shape[0] == 0:
            raise ValueError(f"layers={layers!r} selects no layer range; pass a slice or a "
                             "list of layer indices")
    d = Xa.shape[-1]
    if fit_on == "last":
        F = Xa[-1]
    elif fit_on == "all":
        F = Xa.reshape(-1, d)
    elif isinstance(fit_on, (int, np.integer)):
        F = Xa[fit_on]
    else:
        raise ValueError(f"fit_on must be 'last', 'all' or a layer position, got {fit_on!r}")
    if n_components < 1 or n_components > min(F.shape[0] - 1, d):
        raise ValueError(f"cannot fit {n_components} components on {F.shape[0]} states of "
                         f"dimension {d} (need at most n_states - 1 and d); use fit_on='all' "
                         "or fewer components")
    mean = F.mean(axis=0)
    _, s, Vt = np.linalg.svd(F - mean, full_matrices=False)
    total = (s ** 2).sum()
    if total == 0:
        raise ValueError("the fitted states are all identical: PCA is undefined")
    comps = Vt[:n_components]
    signs = np.sign(comps[np.arange(n_components), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    proj = (Xa - mean) @ comps.T
    return PCAResult(proj[:, 0] if single else proj, s[:n_components] ** 2 / total, comps, mean)
