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
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus  # noqa: E402  (sibling module; scripts/ is not a package)

EOT = "<|endoftext|>"
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
    if spec:
        steps = {int(s) for s in spec.split(",") if s.strip()}
        bad = [s for s in steps if not 0 <= s <= total]
        if bad:
            raise ValueError(f"--checkpoint-steps {bad} outside [0, {total}] (--steps)")
    else:
        steps = {0, total} | {2 ** k for k in range(4, 30) if 2 ** k < total}
    return sorted(steps)


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE over ``texts`` → ``PreTrainedTokenizerFast`` (``<|endoftext|>`` = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # no prefix space: decode(encode(s)) == s exactly, which the prompts rely on
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, pad_token=EOT, model_max_length=max_length)


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long int64 stream: doc₁ EOT doc₂ EOT … (shape ``(n_tokens,)``)."""
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- model and data


def build_model(args: argparse.Namespace, tokenizer):
    """Randomly initialized ``GPT2LMHeadModel`` (seeded by the caller), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, tie_word_embeddings=True,
        # dropout off: the model is deterministic and a tiny model does not overfit here
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # no pad_token_id: windows of the stream contain <|endoftext|> and are never padded
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    # eager attention: 2-3x faster than sdpa for these shapes on CPU, and what Jacobian
    # code uses; it is not stored in config.json, so loaders choose their own
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int,
                 gen: torch.Generator) -> torch.Tensor:
    """``(batch, seq_len + 1)`` random windows of ``stream``.

    Inputs are ``[:, :-1]`` and next-token targets ``[:, 1:]``.
    """
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``windows`` of shape ``(B, T + 1)``."""
    logits = model(input_ids=windows[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None,
             batch: int = 32) -> float:
    """Mean loss (nats/token) over non-overlapping ``seq_len`` windows of ``stream``.

    All windows, or ``max_windows`` of them spaced evenly over the stream (the held-out
    split runs from stdlib prose to generated sentences, so a prefix would be biased).
    """
    n_all = (len(stream) - 1) // seq_len
    n = n_all if max_windows is None else min(n_all, max_windows)
    if n < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one "
                         f"window of {seq_len}; raise --max-chars or lower --seq-len")
    was_training = model.training
    model.eval()
    total = 0.0
    picked = [i * n_all // n for i in range(n)]
    for i in range(0, n, batch):
        idx = picked[i:i + batch]
        windows = torch.stack([stream[j * seq_len:(j + 1) * seq_len + 1] for j in idx])
        total += lm_loss(model, windows).item() * len(idx)
    model.train(was_training)
    return total / n


def make_optimizer(model, args: argparse.Namespace):
    """AdamW (decay on matrices only) + linear warm-up and cosine decay to 10% of ``lr``."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, round(args.warmup_frac * args.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- saving


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` (safetensors) with tensors stored in ``dtype``, tokenizer beside it.

    Only the stored tensors are cast: ``config.json`` keeps ``"dtype": "float32"``, so
    ``from_pretrained`` upcasts a float16 checkpoint and returns a float32 model by default.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        # a passed state_dict is not de-duplicated: drop the tied lm_head copy ourselves
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[key] = tensor.detach().to(dtype)
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)  # safetensors writes 0600; shipped package data must be readable


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    opt, sched = make_optimizer(model, args)
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
        loss = lm_loss(model, sample_batch(train_ids, args.batch_size, args.seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
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
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     **_library_versions()},
    }
    write_json(out / "training.json", record)
    print(f"done: eval loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}), "
          f"{record['wall_time_s']}s", flush=True)
    return record


def _library_versions() -> dict:
    import tokenizers
    import transformers
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
