"""The study's shared LM data: token streams, multiple-choice set and tokenizer.

Every suite model must see the same data, so it is built once by :func:`prepare_lm_data`
(corpus -> tokenizer -> streams -> multiple-choice set) and saved by :func:`save_lm_data`,
so that worker processes load it (:func:`load_lm_data`) instead of rebuilding it. Training
itself is in :mod:`coupling.experiments.study.lm`.

A saved data folder::

    DATA/tokens.npz         train_ids, heldout_ids (int streams) and the MC arrays
    DATA/description.json   corpus sha256, token counts, MC parameters, tokenizer
    DATA/tokenizer/         the tokenizer, saved with save_pretrained

:func:`encode_stream` and :func:`write_json` live here because the data needs them and
:mod:`~coupling.experiments.study.lm` builds on this module, not the other way round.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coupling.experiments.study.lm_eval import (MCSet, build_multiple_choice, mc_from_arrays,
                                                mc_to_arrays)
from coupling.results.owned import atomic_write

DATA_FILES = ("tokens.npz", "description.json")


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long int64 stream: doc₁ EOT doc₂ EOT … (shape ``(n_tokens,)``)."""
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def write_json(path: Path, obj: dict) -> None:
    """Pretty JSON, written atomically (a reader never sees half a file)."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


@dataclass
class LMData:
    """What every suite model is trained and evaluated on."""

    tokenizer: object            # a transformers fast tokenizer
    train_ids: torch.Tensor      # int64 stream, documents joined by <|endoftext|>
    heldout_ids: torch.Tensor    # int64 stream of the held-out documents
    mc: MCSet                    # multiple-choice set cut from heldout_ids
    description: dict            # corpus sha256, token counts, MC parameters, tokenizer


def load_tokenizer(folder):
    """The fast tokenizer saved in ``folder`` (it needs an end-of-text token)."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json; pass a folder saved with "
                         "save_pretrained (e.g. coupling/data/tiny)")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.eos_token_id is None or not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {folder} needs an end-of-text token and a fast "
                         "(tokenizers) backend")
    return tok


def prepare_lm_data(tokenizer_dir, max_chars: int = 8_000_000, seed: int = 0,
                    mc_items: int = 200, mc_context: int = 48, mc_continuation: int = 16,
                    mc_choices: int = 4) -> LMData:
    """Build the corpus, encode it with the tokenizer in ``tokenizer_dir``, cut the MC set.

    ``seed`` seeds both the corpus's generated sentences and the multiple-choice draw.
    """
    from coupling.experiments.study.corpus import build_corpus

    tokenizer = load_tokenizer(tokenizer_dir)
    corpus = build_corpus(max_chars, seed=seed)
    train_ids = encode_stream(tokenizer, corpus.train)
    heldout_ids = encode_stream(tokenizer, corpus.heldout)
    mc = build_multiple_choice(heldout_ids.numpy(), mc_items, mc_context, mc_continuation,
                               mc_choices, seed=seed, boundary_id=tokenizer.eos_token_id)
    tok_json = (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
    description = {
        "corpus": corpus.describe(), "max_chars": max_chars, "seed": seed,
        "tokenizer": {"source": str(tokenizer_dir), "vocab_size": len(tokenizer),
                      "eot_id": tokenizer.eos_token_id,
                      "tokenizer_json_sha256": hashlib.sha256(tok_json).hexdigest()},
        "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
        "multiple_choice": {"items": mc_items, "context": mc_context,
                            "continuation": mc_continuation, "choices": mc_choices,
                            "seed": seed, "chance": 1 / mc_choices},
    }
    return LMData(tokenizer, train_ids, heldout_ids, mc, description)


def save_lm_data(data: LMData, folder) -> None:
    """``folder/tokens.npz`` (streams + MC arrays), ``description.json``, ``tokenizer/``.

    Written into a temporary sibling and renamed, so a reader finds all of it or none.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "tokens.npz", train_ids=data.train_ids.numpy(),
             heldout_ids=data.heldout_ids.numpy(), **mc_to_arrays(data.mc))
    data.tokenizer.save_pretrained(tmp / "tokenizer")
    write_json(tmp / "description.json", data.description)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_lm_data(folder) -> LMData:
    """Inverse of :func:`save_lm_data`."""
    folder = Path(folder)
    missing = [f for f in DATA_FILES + ("tokenizer",) if not (folder / f).exists()]
    if missing:
        raise ValueError(f"{folder} lacks {missing}; write it with save_lm_data")
    with np.load(folder / "tokens.npz", allow_pickle=False) as z:
        streams = {k: torch.from_numpy(z[k].astype(np.int64)) for k in ("train_ids",
                                                                      "heldout_ids")}
        mc = mc_from_arrays(z)
    return LMData(load_tokenizer(folder / "tokenizer"), streams["train_ids"],
                  streams["heldout_ids"], mc,
                  json.loads((folder / "description.json").read_text()))
