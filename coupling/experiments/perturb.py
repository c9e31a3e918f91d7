"""Perturbation of one token's input embedding, traced through the layers (paper Fig. 34).

The token's input embedding ``x`` (the row of the model's input-embedding table that it looks
up: no positional embedding, no scaling the model may apply afterwards) becomes
``x + eps`` with

    eps = sigma * ||x|| / sqrt(d) * z,    z ~ N(0, I_d),

so ``E ||eps||^2 = sigma^2 ||x||^2``: ``sigma`` is the noise level *relative to the
embedding's norm* (sigma = 1: noise as large as the embedding itself).  The model is run on
``inputs_embeds`` and, at every hidden state ``l = 0..L`` (Hugging Face ``hidden_states``;
the last one after the final norm), the perturbed token's state is compared with the clean
one by cosine similarity.  Mean and std are over ``n_samples`` noise draws.

The same draws ``z`` are used at every level (common random numbers), so the curves differ
only through ``sigma``; at the embedding layer of a model that feeds ``inputs_embeds``
straight through (``X^0 = x``, e.g. Llama) each sample's cosine then falls monotonically as
``sigma`` grows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coupling.model.loading import LoadedModel, load_model
from coupling.model.trajectory import model_inputs

DEFAULT_LEVELS = (0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_PROMPT = "What is the capital of France? The capital is"


@dataclass
class PerturbResult:
    """``cosine``: (levels, samples, L+1); ``table``: one row per level x layer."""

    levels: np.ndarray
    cosine: np.ndarray
    rel_change: np.ndarray     # ||h_noisy - h|| / ||h||, same shape
    token: int                 # position of the perturbed token (non-negative)
    n_tokens: int
    embedding_norm: float      # ||x|| of the perturbed token's input embedding
    info: dict

    @property
    def table(self) -> pd.DataFrame:
        n_levels, n_samples, n_layers = self.cosine.shape
        std = self.cosine.std(axis=1, ddof=1) if n_samples > 1 else np.zeros((n_levels, n_layers))
        return pd.DataFrame({
            "level": np.repeat(self.levels, n_layers),
            "layer": np.tile(np.arange(n_layers), n_levels),
            "cos_mean": self.cosine.mean(axis=1).ravel(),
            "cos_std": std.ravel(),
            "rel_change_mean": self.rel_change.mean(axis=1).ravel(),
            "n_samples": n_samples})


def _token_ids(lm: LoadedModel, prompt) -> torch.Tensor:
    if isinstance(prompt, str):
        if lm.tokenizer is None or not callable(lm.tokenizer):
            raise ValueError("the model has no tokenizer: pass token ids instead of text")
        if not prompt.strip():
            raise ValueError("the prompt is empty: pass some text")
        return lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return model_inputs(prompt)["input_ids"]


def _check_levels(levels) -> np.ndarray:
    lv = np.asarray(list(levels), dtype=float)
    if lv.ndim != 1 or lv.size == 0 or not np.isfinite(lv).all() or (lv < 0).any():
        raise ValueError(f"noise levels must be a non-empty list of finite numbers >= 0, "
                         f"got {list(levels)!r}")
    return lv


@torch.no_grad()
def _hidden(model, embeds: torch.Tensor) -> torch.Tensor:
    """``(B, L+1, n, d)`` float64 hidden states for a batch of input embeddings."""
    out = model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False,
                return_dict=True)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states: it cannot be traced")
    return torch.stack([h.double() for h in hs], dim=1)


def perturb(lm: LoadedModel, prompt=DEFAULT_PROMPT, noise_levels=DEFAULT_LEVELS,
            token: int = -1, n_samples: int = 8, seed: int = 0) -> PerturbResult:
    """Cosine similarity of the perturbed and clean hidden state of ``token`` at every layer.

    ``prompt``: text or token ids ``(n,)``/``(1, n)``; ``token``: position (negative counts
    from the end; default the last token); noise as in the module docstring.
    """
    levels = _check_levels(noise_levels)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    ids = _token_ids(lm, prompt).to(lm.device)
    n = ids.shape[1]
    if not -n <= token < n:
        raise ValueError(f"token {token} is out of range for a prompt of {n} tokens: "
                         f"use -{n}..{n - 1}")
    t = token % n
    embed = lm.model.get_input_embeddings()
    if embed is None:
        raise ValueError(f"{type(lm.model).__name__} has no input embedding to perturb")
    E = embed(ids)                                              # (1, n, d)
    d = E.shape[-1]
    x = E[0, t].double()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n_samples, d), generator=gen, dtype=torch.float64)
    clean = _hidden(lm.model, E)[0, :, t]                       # (L+1, d)
    cos, rel = [], []
    for sigma in levels:
        eps = sigma * x.norm() / np.sqrt(d) * z                 # (S, d)
        batch = E.repeat(n_samples, 1, 1)
        batch[:, t] = (x + eps).to(E.dtype)
        noisy = _hidden(lm.model, batch)[:, :, t]               # (S, L+1, d)
        cos.append(torch.nn.functional.cosine_similarity(noisy, clean[None], dim=-1))
        rel.append((noisy - clean[None]).norm(dim=-1) / clean.norm(dim=-1)[None])
    info = {k: lm.info.get(k) for k in ("id", "revision", "random_init", "n_layers", "d_model")}
    return PerturbResult(levels, torch.stack(cos).cpu().numpy(), torch.stack(rel).cpu().numpy(),
                         t, n, float(x.norm()), info)


# ------------------------------------------------------------------------------------------
# Figure and files
# ------------------------------------------------------------------------------------------
def perturbation_figure(res: PerturbResult):
    """Left: cosine vs layer, one line per level (band: +/- std over samples).
    Right: cosine at the first and last hidden state vs noise level (Fig. 34)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    mean, std = res.cosine.mean(axis=1), res.cosine.std(axis=1)
    layers = np.arange(res.cosine.shape[2])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    cmap = colormaps["plasma"]
    for i, sigma in enumerate(res.levels):
        c = cmap(0.85 * i / max(1, len(res.levels) - 1))
        ax.plot(layers, mean[i], "-o", ms=3, color=c, label=f"$\\sigma$={sigma:g}")
        ax.fill_between(layers, mean[i] - std[i], mean[i] + std[i], color=c, alpha=0.2, lw=0)
    ax.set_xlabel("hidden state $l$ (0 = embedding output)")
    ax.set_ylabel("cosine(perturbed, clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pos = res.levels > 0
    for l, style in ((0, "-o"), (len(layers) - 1, "-s")):
        ax2.errorbar(res.levels[pos], mean[pos, l], yerr=std[pos, l], fmt=style, capsize=3,
                     label=f"hidden state {l}" + (" (first)" if l == 0 else " (last)"))
    ax2.set_xscale("log")
    ax2.set_xlabel(r"noise level $\sigma$ (noise norm / embedding norm)")
    ax2.set_ylabel("cosine(perturbed, clean)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    name = res.info.get("id") or "model"
    if res.info.get("random_init"):
        name += " (random init)"
    last = " (the last)" if res.token == res.n_tokens - 1 else ""
    fig.suptitle(f"{name}: noise on the input embedding of token {res.token}{last} of "
                 f"0..{res.n_tokens - 1} ($\\|x\\|$={res.embedding_norm:.3g}), "
                 f"{res.cosine.shape[1]} samples per level", fontsize=10)
    return fig


def write_perturbation(res: PerturbResult, out_dir) -> list[Path]:
    """``perturbation.csv`` (the table), ``perturbation.json`` (settings) and
    ``perturbation.png`` into ``out_dir``."""
    out = Path(out_dir)
    if out.is_file():
        raise ValueError(f"--out {out} is a file: pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    res.table.to_csv(out / "perturbation.csv", index=False, float_format="%.6g")
    meta = {"model": res.info, "levels": res.levels.tolist(), "token": res.token,
            "n_tokens": res.n_tokens, "embedding_norm": res.embedding_norm,
            "n_samples": int(res.cosine.shape[1]),
            "noise": "eps = sigma * ||x|| / sqrt(d) * z, z ~ N(0, I_d), same z at every level"}
    (out / "perturbation.json").write_text(json.dumps(meta, indent=2))
    fig = perturbation_figure(res)
    fig.savefig(out / "perturbation.png", dpi=110)
    return [out / "perturbation.csv", out / "perturbation.json", out / "perturbation.png"]


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def cmd_perturb(args) -> int:
    lm = load_model(args.model, revision=args.revision, random_init=args.random_init)
    res = perturb(lm, args.prompt, args.levels, token=args.token, n_samples=args.samples,
                  seed=args.seed)
    write_perturbation(res, args.out)
    t = res.table
    last = t["layer"].max()
    view = t[t["layer"].isin([0, last])].pivot(index="level", columns="layer", values="cos_mean")
    view.columns = [f"cos at layer {c}" for c in view.columns]
    print(view.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"results in {args.out} (perturbation.csv, perturbation.png)")
    return 0
