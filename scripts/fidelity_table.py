#!/usr/bin/env python3
"""Trained vs random init, plain vs ``--deflate-ln``, with the spectral-gap flags.

GPT-2 style: the embedded tiny model (6 layers, d = 64, trained by the project) and the same
config at random init. BERT style (post-LN): a random-init BERT of the same width and depth
(the project has no trained encoder). Each is scanned over the first ``--prompts`` built-in
prompts at K = ``--k`` (default settings otherwise: last token, the paper's last block).
Prints a markdown table: mean normalized mis-coupling, LSS, how many layers per prompt have an
undetermined top-K subspace (``depth_undetermined_layers``), and the smallest ``s_K/s_{K+1}``.

    python3 scripts/fidelity_table.py --prompts 72 --k 10
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=72)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="random-init seed")
    return p.parse_args(argv)


def bert_folder(work: Path, seed: int) -> str:
    """A random BERT with the tiny model's width, depth and tokenizer."""
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.zoo import save_random, small_config

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    cfg = small_config("bert", n_layers=6, d=64, heads=4, vocab=len(tok), max_pos=256)
    return save_random(cfg, work / "bert-6", seed=seed, tokenizer=tok)


def main(argv=None) -> int:
    args = parse_args(argv)
    from coupling.scan import scan

    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    bert = bert_folder(work, args.seed)
    rows = [("GPT-2 style (tiny)", "trained", None, False),
            ("GPT-2 style (tiny)", "random init", None, True),
            ("BERT style (post-LN)", "random init", bert, False)]
    print("| model | weights | deflate-ln | mean m̃ | LSS | undetermined layers / prompt "
          "| smallest s_K/s_K+1 |")
    print("|---|---|---|---|---|---|---|")
    for name, weights, model, random_init in rows:
        for deflate in (False, True):
            res = scan(model, random_init=random_init, init_seed=args.seed, prompts="builtin",
                       max_prompts=args.prompts, k=args.k, deflate_ln=deflate, figures=False,
                       progress=False)
            s, layers = res.summary, res.layers
            print(f"| {name} | {weights} | {'yes' if deflate else 'no'} "
                  f"| {s.depth_mis_coupling_mean.mean():.4f} | {s.lss.mean():.3f} "
                  f"| {s.depth_undetermined_layers.mean():.2f} "
                  f"| {layers.sv_gap.min():.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
