"""Training the study's small GPT-2 causal LMs: one corpus, one tokenizer, one recipe.

The study varies one factor at a time (width, depth, steps, weight decay, dropout, seed), so
everything else must be identical between runs: the token streams and the multiple-choice set
are built once (:mod:`coupling.experiments.study.lm_data`) and every
model is trained by :func:`train_lm` with the recipe of
``scripts/train_tiny.py`` (AdamW with decay on matrices only, linear warm-up, cosine decay to
10% of the peak rate, gradient clipping at 1, random windows of the training stream). The
script imports its building blocks from here, so the shipped tiny model and the suite share
one implementation.

A finished run's folder::

    OUT/checkpoints/step-<N>/     config.json, model.safetensors (float32), tokenizer files,
                                  trainer_state.json (step, loss, eval_loss, eval_acc, mc_acc,
                                  tokens_seen, lr)
    OUT/training.json             spec, parameter counts, metrics per checkpoint, wall time,
                                  versions; written last, so its presence means "finished"

On the CPU a run is bit-for-bit reproducible for a given seed, spec, data and thread count;
on CUDA only up to its non-deterministic kernels (the embedding gradient adds atomically).
Batches are drawn on the CPU, so every device trains on the same windows.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coupling.experiments.study.lm_data import LMData, write_json
from coupling.experiments.study.lm_eval import (heldout_metrics, multiple_choice_accuracy,
                                                next_token_loss)

__all__ = ["EOT", "NAME_RE", "train_tokenizer", "build_model", "sample_batch", "lm_loss",
           "train_step", "make_optimizer", "checkpoint_steps", "save_model", "versions", "LMSpec",
           "count_parameters", "evaluate_checkpoint", "train_lm"]

EOT = "<|endoftext|>"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------
# The recipe's building blocks (shared with scripts/train_tiny.py)
# ------------------------------------------------------------------------------------------
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


def build_model(tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                dropout: float = 0.0):
    """Randomly initialized ``GPT2LMHeadModel`` (seeded by the caller), tied embeddings.

    ``dropout`` is used for the residual, embedding and attention dropout alike.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, tie_word_embeddings=True,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
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
    return next_token_loss(logits, windows[:, 1:])


def train_step(model, opt, sched, windows: torch.Tensor) -> torch.Tensor:
    """One optimizer step on ``windows`` (gradient norm clipped at 1); returns the loss."""
    loss = lm_loss(model, windows)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def make_optimizer(model, lr: float, weight_decay: float, steps: int, warmup_frac: float):
    """AdamW (decay on matrices only) + linear warm-up and cosine decay to 10% of ``lr``."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, round(warmup_frac * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def checkpoint_steps(total: int, requested: list[int] | None = None) -> list[int]:
    """Sorted checkpoint steps: ``requested``, or 0, 16, 32, … (powers of two below ``total``)
    and ``total``."""
    if requested is None:
        return sorted({0, total} | {2 ** k for k in range(4, 30) if 2 ** k < total})
    bad = sorted(s for s in set(requested) if not 0 <= s <= total)
    if bad:
        raise ValueError(f"checkpoint steps {bad} outside [0, {total}]; keep them between 0 "
                         "and the number of training steps")
    return sorted(set(requested))


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


def versions() -> dict:
    import tokenizers
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


# ------------------------------------------------------------------------------------------
# The suite's run specification
# ------------------------------------------------------------------------------------------
@dataclass
class LMSpec:
    """One suite model: architecture, training recipe and checkpoint schedule.

    ``checkpoint_steps`` None means 0, the powers of two from 16 below ``steps``, and
    ``steps``; the final step is always checkpointed. ``eval_windows`` None scores every
    held-out window at every checkpoint, an integer that many evenly spaced ones.
    """

    name: str
    n_layer: int = 6
    n_embd: int = 64
    n_head: int = 4
    steps: int = 1000
    weight_decay: float = 0.1
    dropout: float = 0.0
    seed: int = 0
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 64
    n_positions: int = 128
    warmup_frac: float = 0.05
    checkpoint_steps: list[int] | None = None
    eval_windows: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(f"LMSpec name {self.name!r} must be letters, digits, '.', '_' or "
                             "'-' (it names the run's folder)")
        for f in ("n_layer", "n_embd", "n_head", "steps", "batch_size", "seq_len",
                  "n_positions"):
            _check_int(self, f, 1)
        _check_int(self, "seed", 0)
        if self.eval_windows is not None:
            _check_int(self, "eval_windows", 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"{self.name}: n_embd {self.n_embd} must be divisible by n_head "
                             f"{self.n_head}")
        if self.seq_len > self.n_positions:
            raise ValueError(f"{self.name}: seq_len {self.seq_len} exceeds n_positions "
                             f"{self.n_positions}; lower seq_len or raise n_positions")
        for f, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf),
                          ("dropout", 0.0, 1.0), ("warmup_frac", 0.0, 1.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi \
                    or (f == "lr" and v == 0):
                raise ValueError(f"{self.name}: {f}={v!r} must be a number in "
                                 f"{'(' if f == 'lr' else '['}{lo}, {hi})")
        if self.checkpoint_steps is not None:
            if not isinstance(self.checkpoint_steps, (list, tuple)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) for s in self.checkpoint_steps):
                raise ValueError(f"{self.name}: checkpoint_steps {self.checkpoint_steps!r} must "
                                 "be a list of integers")
            checkpoint_steps(self.steps, list(self.checkpoint_steps))

    def schedule(self) -> list[int]:
        """The steps at which checkpoints are saved (always including the final step)."""
        requested = None if self.checkpoint_steps is None else list(self.checkpoint_steps)
        return sorted(set(checkpoint_steps(self.steps, requested)) | {self.steps})


def _check_int(spec: LMSpec, field: str, lo: int) -> None:
    v = getattr(spec, field)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{spec.name}: {field}={v!r} must be an integer >= {lo}")


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def count_parameters(model) -> dict:
    """Total (tied weights once) and non-embedding (without token and position embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "non_embedding": total - emb}


def _check_data(spec: LMSpec, data: LMData) -> None:
    if len(data.train_ids) <= spec.seq_len + 1:
        raise ValueError(f"{spec.name}: training stream has {len(data.train_ids)} tokens, not "
                         f"more than seq_len {spec.seq_len}; use more text")
    c, m = data.mc.context.shape[1], data.mc.choices.shape[2]
    if c + m > spec.n_positions:
        raise ValueError(f"{spec.name}: multiple-choice items of {c + m} tokens exceed "
                         f"n_positions {spec.n_positions}; raise n_positions")


def _fresh_output(out: Path, log) -> None:
    # a folder without training.json is an unfinished (or stale) run: start it over
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").unlink(missing_ok=True)
    if (out / "checkpoints").exists():
        log(f"removing old {out / 'checkpoints'}")
        shutil.rmtree(out / "checkpoints")


def _save_checkpoint(model, tokenizer, folder: Path, state: dict) -> None:
    """Model (float32), tokenizer and trainer_state.json, renamed into place complete."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp, torch.float32)
    write_json(tmp / "trainer_state.json", state)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def evaluate_checkpoint(model, spec: LMSpec, data: LMData) -> dict:
    """eval_loss, eval_acc (held-out windows) and mc_acc of ``model`` as it is now."""
    metrics = heldout_metrics(model, data.heldout_ids, spec.seq_len, spec.eval_windows)
    metrics["mc_acc"] = multiple_choice_accuracy(model, data.mc)
    return metrics


def train_lm(spec: LMSpec, data: LMData, out_dir, device: str = "cpu",
             threads: int | None = None, log=print) -> dict:
    """Train ``spec`` on ``data`` into ``out_dir``; returns the ``training.json`` record.

    ``threads`` (if given) sets torch's thread count for the whole process.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint is noise
    t0 = time.time()
    out = Path(out_dir)
    _check_data(spec, data)
    if threads is not None:
        torch.set_num_threads(threads)
    _fresh_output(out, log)
    # same RNG order as scripts/train_tiny.py: global seed -> init, then the batch generator
    torch.manual_seed(spec.seed)
    model = build_model(data.tokenizer, spec.n_layer, spec.n_embd, spec.n_head,
                        spec.n_positions, spec.dropout).to(device)
    params = count_parameters(model)
    opt, sched = make_optimizer(model, spec.lr, spec.weight_decay, spec.steps,
                                spec.warmup_frac)
    gen = torch.Generator().manual_seed(spec.seed)
    schedule = set(spec.schedule())
    tokens_per_step = spec.batch_size * spec.seq_len
    log_every = max(1, spec.steps // 10)
    log(f"{spec.name}: {params['total']:,} parameters, {spec.steps} steps on {device}")
    metrics, since = [], []  # since: detached losses of the steps since the last checkpoint
    t_eval = 0.0  # checkpoint time, left out of the ms/step figure

    model.train()
    t_train = time.time()
    for step in range(spec.steps + 1):
        if step in schedule:
            t_ckpt = time.time()
            loss = torch.stack(since).mean().item() if since else None
            state = {"step": step, "loss": loss, **evaluate_checkpoint(model, spec, data),
                     "tokens_seen": step * tokens_per_step, "lr": sched.get_last_lr()[0]}
            _save_checkpoint(model, data.tokenizer, out / "checkpoints" / f"step-{step}", state)
            metrics.append(state)
            since = []
            log(f"  {spec.name} step {step}: eval loss {state['eval_loss']:.4f}, "
                f"acc {state['eval_acc']:.3f}, mc {state['mc_acc']:.3f}")
            t_eval += time.time() - t_ckpt
        if step == spec.steps:
            break
        windows = sample_batch(data.train_ids, spec.batch_size, spec.seq_len, gen).to(device)
        loss = train_step(model, opt, sched, windows)
        since.append(loss.detach())  # no .item(): a device sync per step slows a GPU down
        if (step + 1) % log_every == 0:
            value = loss.item()  # waits for the device, so the time below is honest
            ms = 1000 * (time.time() - t_train - t_eval) / (step + 1)
            log(f"  {spec.name} step {step + 1}/{spec.steps}  loss {value:.4f}  {ms:.0f} ms/step")

    record = {
        "spec": dataclasses.asdict(spec), "schedule": sorted(schedule),
        "parameters": params["total"], "non_embedding_parameters": params["non_embedding"],
        "tokens_per_step": tokens_per_step, "tokens_seen": spec.steps * tokens_per_step,
        "final": metrics[-1], "checkpoints": metrics,
        "data": {k: data.description.get(k) for k in ("corpus", "tokenizer", "train_tokens",
                                                      "heldout_tokens", "multiple_choice")},
        "device": str(device), "threads": torch.get_num_threads(),
        "train_ms_per_step": round(1000 * (time.time() - t_train - t_eval) / spec.steps, 2),
        "checkpoint_time_s": round(t_eval, 1),
        "wall_time_s": round(time.time() - t0, 1), "versions": versions(),
    }
    write_json(out / "training.json", record)
    log(f"{spec.name}: done, eval loss {metrics[-1]['eval_loss']:.4f} "
        f"({record['wall_time_s']} s)")
    return record
