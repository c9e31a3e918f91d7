r"""Prompt sources for the scanner: a built-in set, local JSONL files and benchmark test sets.

Sources accepted by :func:`load_prompts`: ``"builtin"``, a path to a ``.jsonl`` file, or
``"hf:NAME[/CONFIG][:split]"``.  :func:`load_benchmark` also reads a local JSON/JSONL/Parquet
copy of a benchmark (``data_files=``) so the converters run without the Hub.

The sources themselves are in :mod:`coupling.prompts.jsonl` (the :class:`Prompt` record, JSONL
files, the built-in set) and :mod:`coupling.prompts.benchmarks` (the benchmark converters, in the
lm-evaluation-harness's zero-shot form).  This
module is the entry point (:func:`load_prompts`) and turns one prompt into token ids
(:func:`tokenize_prompt`).
"""
from __future__ import annotations

import os
import random
from typing import Any

from coupling.prompts.benchmarks import BENCHMARKS, load_benchmark, parse_hf_source
from coupling.prompts.jsonl import Prompt, _builtin_prompts, read_jsonl_prompts

__all__ = ["load_prompts", "tokenize_prompt"]


# --------------------------------------------------------------------------------------------
# Single entry point
# --------------------------------------------------------------------------------------------

def load_prompts(source: str, max_prompts: int | None = None,
                 seed: int | None = None) -> list[Prompt]:
    """Load prompts from ``"builtin"``, a ``.jsonl`` path, or ``"hf:NAME[/CONFIG][:split]"``.

    With ``seed`` the list is shuffled (``random.Random(seed)``) before ``max_prompts`` takes the
    first N, so a given (source, seed, N) always returns the same prompts in the same order.
    """
    if max_prompts is not None and (isinstance(max_prompts, bool)
                                    or not isinstance(max_prompts, int) or max_prompts < 1):
        raise ValueError(f"max_prompts must be a positive integer or None, got {max_prompts!r}")
    source_str = os.fspath(source)
    if source_str == "builtin":
        prompts = _builtin_prompts()
    elif source_str.startswith("hf:"):
        key, config, split = parse_hf_source(source_str)
        prompts = load_benchmark(key, split=split, config=config)
    elif source_str.lower().endswith(".jsonl"):
        if not os.path.isfile(source_str):
            raise ValueError(f"prompt file {source_str!r} not found; fix: check the path")
        prompts = read_jsonl_prompts(source_str)
    else:
        raise ValueError(f"unknown prompt source {source_str!r}; fix: use 'builtin', a path "
                         "to a .jsonl file, or 'hf:NAME[:split]' with NAME one of "
                         f"{', '.join(BENCHMARKS)}")
    if seed is not None:
        prompts = list(prompts)
        random.Random(seed).shuffle(prompts)
    return prompts[:max_prompts] if max_prompts is not None else prompts


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------

def tokenize_prompt(tokenizer: Any, text: "str | Prompt", max_length: int | None = None,
                    *, prompt_id: str | None = None):
    """Tokenize one prompt with the tokenizer's defaults (special tokens included as the
    tokenizer adds them); returns ``input_ids`` as a ``(1, n)`` long tensor.

    ``text`` may be a :class:`Prompt` (its id is used in errors).  Raises ``ValueError`` when
    the text is blank, tokenizes to 0 tokens, or has more than ``max_length`` tokens (pass the
    model's context length).
    """
    if isinstance(text, Prompt):
        prompt_id = prompt_id or text.id
        text = text.text
    if not isinstance(text, str):
        raise ValueError(f"prompt {prompt_id} must be a string or Prompt, got {type(text).__name__}")
    name = prompt_id if prompt_id is not None else repr(text[:40])
    if not text.strip():
        raise ValueError(f"prompt {name} is empty: give it some text")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    n = int(input_ids.shape[-1])
    if n == 0:
        raise ValueError(f"prompt {name} is empty after tokenization (0 tokens for "
                         f"{text[:40]!r}): the tokenizer drops all of its characters; use "
                         "text the tokenizer can encode")
    if max_length is not None and n > max_length:
        raise ValueError(f"prompt {name} has {n} tokens, more than the model's context of "
                         f"{max_length}: use a shorter prompt or truncate with --max-tokens")
    return input_ids.reshape(1, n)
