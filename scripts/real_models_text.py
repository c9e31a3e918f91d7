"""Real English prose shipped with Python, split into scan prompts and held-out evaluation text.

Source: ``pydoc_data.topics`` (the Python Language Reference's text that ``help()`` shows;
part of every CPython install, and not in the study corpus, which reads only docstrings and
comments of the standard library). A paragraph is prose when its first line is not indented
(indented blocks are grammar and code), it is not a heading, has >= 12 words, no ``>>>`` or
``::=`` and >= 90 % letters and spaces. Topics split by ``crc32(topic) % 4``: 0 -> prompts
(the first sentence of each paragraph, >= 6 words, deduplicated), else -> held-out text.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zlib

PROMPT_MODULUS = 4
MIN_WORDS, MIN_PROMPT_WORDS, MIN_LETTERS = 12, 6, 0.9


def _prose(block: list[str]) -> str | None:
    heading = len(block) > 1 and set(block[1].strip()) <= set("*=-~^")
    if block[0].startswith(" ") or heading:
        return None
    text = " ".join(line.strip() for line in block).removeprefix("* ")
    if len(text.split()) < MIN_WORDS or ">>>" in text or "::=" in text:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    return text if letters >= MIN_LETTERS else None


def paragraphs() -> list[tuple[str, str]]:
    """``(topic, paragraph)`` for every prose paragraph, topics in sorted order."""
    import pydoc_data.topics as topics

    out = []
    for key in sorted(topics.topics):
        block: list[str] = []
        for line in topics.topics[key].splitlines() + [""]:
            if line.strip():
                block.append(line)
                continue
            text = _prose(block) if block else None
            if text:
                out.append((key, text))
            block = []
    return out


def split() -> tuple[list[dict], dict[str, list[str]]]:
    """``(prompts, {topic: held-out paragraphs})``; prompts are JSONL records (id, text,
    topic); the two never share a topic."""
    prompts, heldout, seen = [], {}, set()
    for key, text in paragraphs():
        if zlib.crc32(key.encode()) % PROMPT_MODULUS:
            heldout.setdefault(key, []).append(text)
            continue
        first = re.split(r"(?<=[.:;!?])\s", text, maxsplit=1)[0]
        if len(first.split()) >= MIN_PROMPT_WORDS and first not in seen:
            seen.add(first)
            prompts.append({"id": f"{key}-{len(prompts)}", "text": first, "topic": key})
    return prompts, heldout


def _digest(items) -> str:
    return hashlib.sha256("\0".join(items).encode("utf-8")).hexdigest()


def provenance(prompts, heldout) -> dict:
    """What the text is, so a rerun on another Python can be matched to it (or not)."""
    paras = [p for topic in heldout.values() for p in topic]
    return {"source": "pydoc_data.topics (Python Language Reference)",
            "python": sys.version.split()[0], "prompt_topics": len({p["topic"] for p in prompts}),
            "n_prompts": len(prompts), "prompts_sha256": _digest([p["text"] for p in prompts]),
            "heldout_topics": len(heldout), "heldout_paragraphs": len(paras),
            "heldout_chars": sum(map(len, paras)), "heldout_sha256": _digest(paras)}


def heldout_stream(tokenizer, heldout) -> tuple[list[int], int]:
    """Held-out token ids: a topic's paragraphs joined by blank lines, topics separated by the
    end-of-text token (returned too: no multiple-choice span may cross a topic boundary)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token to separate the topics")
    ids: list[int] = []
    for topic in sorted(heldout):
        ids += tokenizer("\n\n".join(heldout[topic]), add_special_tokens=False)["input_ids"]
        ids.append(eos)
    return ids, eos


def write_prompts(path, prompts) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps(p) + "\n")
