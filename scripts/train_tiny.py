"""Train the project's tiny GPT-2-style causal LM on CPU, with log-spaced checkpoints.

The model is the scanner's embedded default: small enough to ship inside the package
(``coupling/data/tiny/``) and to take exact block Jacobians of in seconds, yet trained, so
that coupling can be compared between initialization, intermediate checkpoints and the end.

Pipeline (fully deterministic for a given Python installation, seed and arguments):

1. text: ``make_corpus.build_corpus`` (stdlib docstrings/comments + generated sentences);
2. tokenizer: byte-level BPE trained here with ``tokenizers`` (``<|endoftext|>`` is id 0 and
   serves as bos/eos/pad/unk), wrapped as a ``transformers`` fast tokenizer;
3. model: ``GPT2LMHeadModel`` (tied embeddings, no dropout) trained with AdamW, linear warm-up
   then cosine decay to 10% of the peak learning rate, on random windows of the token stream;
4. output folder ``OUT``::

       OUT/config.json, model.safetensors, tokenizer*.json   final model, float32
       OUT/training.json                                     provenance and results
       OUT/heldout_sample.txt                                held-out text for quick checks
       OUT/checkpoints/step-<N>/                             model + tokenizer +
                                                             trainer_state.json

   Checkpoint tensors are stored in ``--checkpoint-dtype`` (float16 keeps the folder under
   10 MB) but their config says float32, so ``from_pretrained`` returns a float32 model.

Usage::

    python3 scripts/train_tiny.py --out coupling/data/tiny [--steps N] [--seed S]
                                  [--checkpoint-dtype float16]
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from coupling.experiments.study import corpus as make_corpus
from coupling.experiments.study import lm
from coupling.experiments.study.lm import (EOT, build_model, make_optimizer, sample_batch,
                                           save_model, train_step, train_tokenizer, versions)
from coupling.experiments.study.lm_data import encode_stream, write_json
from coupling.experiments.study.lm_eval import heldout_metrics

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HELDOUT_SAMPLE_CHARS = 16_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--steps", type=int, default=1600, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dtype", choices=sorted(DTYPES), default="float16",
                    help="dtype of the intermediate checkpoints (the final model is float32)")
    ap.add_argument("--checkpoint-steps", type=str, default=None,
                    help="comma-separated steps; default: 0 and powers of 2 from 16, and the end")
    ap.add_argument("--max-chars", type=int, default=8_000_000,
                    help="training text limit (the stdlib yields ~3.6 MB, so the default is all)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128, help="training window in tokens")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--eval-windows", type=int, default=64,
                    help="held-out windows, evenly spaced, scored at each checkpoint "
                         "(the end scores all)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    _validate(args)
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: need at least 1 optimizer step")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if args.seq_len > args.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds --n-positions {args.n_positions}; "
                         "lower --seq-len or raise --n-positions")
    if args.vocab_size <= 257:
        raise ValueError(f"--vocab-size {args.vocab_size}: byte-level BPE needs more than 257 "
                         "(256 byte tokens + <|endoftext|>), e.g. 1024")


def checkpoint_steps(total: int, spec: str | None) -> list[int]:
    """Sorted steps at which to checkpoint: ``spec`` ("0,8,64") or 0, 16, 32, …, and ``total``."""
    requested = [int(s) for s in spec.split(",") if s.strip()] if spec else None
    return lm.checkpoint_steps(total, requested)


# ---------------------------------------------------------------- helpers
# tokenizer, model, batches, loss, optimizer and saving live in coupling.experiments.study.lm, shared
# with the study's model suite


def evaluate(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> float:
    """Mean held-out loss (nats/token) over non-overlapping windows (see ``heldout_metrics``)."""
    return heldout_metrics(model, stream, seq_len, max_windows)["eval_loss"]


def heldout_sample(docs: list[str], n_chars: int = HELDOUT_SAMPLE_CHARS) -> str:
    """At most ``n_chars`` of held-out text: the openings of 24 documents spread over the split."""
    picked = docs[:: max(1, len(docs) // 24)][:24]
    per_doc = n_chars // max(1, len(picked)) - len(EOT)
    return EOT.join(doc[:per_doc] for doc in picked)


# ---------------------------------------------------------------- main


def train(args: argparse.Namespace) -> dict:
    """Run the whole pipeline; returns the ``training.json`` record."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint is noise
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if (out / "checkpoints").exists():
        # stale step-<N> folders from an earlier run would mix two trainings
        print(f"removing old {out / 'checkpoints'}", flush=True)
        shutil.rmtree(out / "checkpoints")

    corpus = make_corpus.build_corpus(args.max_chars, seed=args.seed)
    tokenizer = train_tokenizer(corpus.train, args.vocab_size, args.n_positions)
    train_ids = encode_stream(tokenizer, corpus.train)
    heldout_ids = encode_stream(tokenizer, corpus.heldout)
    if len(train_ids) <= args.seq_len + 1:
        raise ValueError(f"training stream has {len(train_ids)} tokens, not more than "
                         f"--seq-len {args.seq_len}; raise --max-chars")
    print(f"corpus: {corpus.train_chars:,} train chars -> {len(train_ids):,} tokens, "
          f"{len(heldout_ids):,} held-out tokens, vocab {len(tokenizer)} "
          f"({time.time() - t0:.1f}s)", flush=True)

    model = build_model(tokenizer, args.n_layer, args.n_embd, args.n_head, args.n_positions)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.steps, args.warmup_frac)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt_at = checkpoint_steps(args.steps, args.checkpoint_steps)
    ckpt_dtype = DTYPES[args.checkpoint_dtype]
    tokens_per_step = args.batch_size * args.seq_len
    curve, checkpoints, recent = [], [], []
    loss_value = None  # no training loss before the first step

    def checkpoint(step: int) -> None:
        eval_loss = evaluate(model, heldout_ids, args.seq_len, args.eval_windows)
        folder = out / "checkpoints" / f"step-{step}"
        save_model(model, tokenizer, folder, ckpt_dtype)
        state = {"step": step, "loss": loss_value, "eval_loss": eval_loss,
                 "eval_windows": args.eval_windows, "tokens_seen": step * tokens_per_step,
                 "lr": sched.get_last_lr()[0], "stored_dtype": args.checkpoint_dtype}
        write_json(folder / "trainer_state.json", state)
        checkpoints.append(state)
        print(f"  checkpoint step {step}: eval loss {eval_loss:.4f}", flush=True)

    model.train()
    t_train = time.time()
    for step in range(args.steps + 1):
        if step in ckpt_at:
            checkpoint(step)
        if step == args.steps:
            break
        loss = train_step(model, opt, sched,
                          sample_batch(train_ids, args.batch_size, args.seq_len, gen))
        recent.append(loss.item())
        # "loss" of a checkpoint = mean training loss of the steps since the last log line
        loss_value = sum(recent) / len(recent)
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            rate = (step + 1) * tokens_per_step / (time.time() - t_train)
            print(f"step {step + 1:5d}  loss {loss_value:.4f}  lr {sched.get_last_lr()[0]:.2e}"
                  f"  {rate:,.0f} tok/s  {time.time() - t0:.0f}s", flush=True)
            curve.append({"step": step + 1, "loss": round(loss_value, 5)})
            recent = []

    eval_loss = evaluate(model, heldout_ids, args.seq_len)
    save_model(model, tokenizer, out, torch.float32)
    (out / "heldout_sample.txt").write_text(heldout_sample(corpus.heldout))
    record = {
        # as run from the repository root, wherever the script was invoked from
        "command": shlex.join(["python3", "scripts/train_tiny.py"] + sys.argv[1:]),
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": corpus.describe(),
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "eot_token": EOT, "eot_id": tokenizer.eos_token_id},
        "model": {"class": "GPT2LMHeadModel", "parameters": n_params,
                  "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                  "n_positions": args.n_positions, "tied_embeddings": True},
        "tokens_seen": args.steps * tokens_per_step,
        "final_train_loss": loss_value,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "eval_tokens": (len(heldout_ids) - 1) // args.seq_len * args.seq_len,
        "loss_curve": curve,
        "checkpoints": checkpoints,
        "wall_time_s": round(time.time() - t0, 1),
        "versions": versions(),
    }
    write_json(out / "training.json", record)
    print(f"done: eval loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}), "
          f"{record['wall_time_s']}s", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
