r"""Benchmark test sets as prompts: one converter per benchmark, its registry and loading.

Every row becomes a ``Prompt(id, text, meta)`` (:mod:`coupling.prompts.jsonl`), the way the
Open LLM Leaderboard's lm-evaluation-harness writes its *zero-shot context* (the text the model
reads before the answer), because the paper measures coupling on these benchmarks' prompts:

- arc: ``allenai/ai2_arc`` ARC-Challenge/test -> ``Question: {question}\nAnswer:``
- gsm8k: ``openai/gsm8k`` main/test -> ``Question: {question}\nAnswer:``
- hellaswag: ``Rowan/hellaswag`` validation -> ``{activity_label}: {ctx_a} {ctx_b.capitalize()}``
  cleaned by the harness preprocess (:func:`hellaswag_preprocess`)
- mmlu: ``cais/mmlu`` all/test -> subject header line, question, ``A. .. D. ..``, ``Answer:``
- truthfulqa: ``truthfulqa/truthful_qa`` multiple_choice/validation -> the harness's 6 Q/A
  preamble + ``\n\nQ: {question}\nA:``
- winogrande: ``allenai/winogrande`` winogrande_xl/validation -> the sentence up to ``_`` with
  option1 filled in (the harness's partial-evaluation context)
- wikitext: ``Salesforce/wikitext`` wikitext-2-raw-v1/test -> one prompt per paragraph line
  (blank and ``= heading =`` lines skipped)

(HellaSwag and Winogrande test splits have no labels and TruthfulQA has only a validation
split, hence validation there.)

Benchmarks are named ``NAME[/CONFIG]`` (a key, alias or Hub id; :func:`parse_hf_source`
reads the ``"hf:NAME[/CONFIG][:split]"`` source strings of :func:`coupling.prompts.sources.load_prompts`).
:func:`load_benchmark` also reads a local JSON/JSONL/Parquet copy of a benchmark
(``data_files=``) so the converters run without the Hub.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from coupling.prompts.jsonl import Prompt

# --------------------------------------------------------------------------------------------
# Benchmark converters: one dataset row -> one Prompt (or None to skip the row)
# --------------------------------------------------------------------------------------------

def _require(row: dict, fields: Sequence[str], bench: str, index: int) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(
            f"{bench} row {index} lacks field(s) {missing} (has {sorted(row)}): the file or "
            f"config is not in the {bench} layout; fix: use the dataset/config listed in "
            f"coupling.prompts.sources.BENCHMARKS['{bench}'] or convert your file to its fields")


def _arc(row: dict, index: int) -> Prompt:
    _require(row, ("id", "question", "choices", "answerKey"), "arc", index)
    labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    key = row["answerKey"]
    gold = labels.index(key) if key in labels else None
    meta = {"source": "arc", "answer": key, "gold_index": gold, "choices": texts,
            "choice_labels": labels}
    if gold is not None:
        meta["answer_text"] = texts[gold]
    return Prompt(f"arc-{row['id']}", f"Question: {row['question']}\nAnswer:", meta)


def _gsm8k(row: dict, index: int) -> Prompt:
    _require(row, ("question", "answer"), "gsm8k", index)
    solution = row["answer"]
    # The harness scores the number after "#### " in the reference solution.
    final = solution.split("####")[-1].strip() if "####" in solution else None
    meta = {"source": "gsm8k", "answer": final, "solution": solution}
    return Prompt(f"gsm8k-{index}", f"Question: {row['question']}\nAnswer:", meta)


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness HellaSwag cleaning: strip, ``" [title]"`` -> ``". "``, drop
    ``[...]`` tags (WikiHow artefacts), then collapse double spaces once (as the harness does)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, index: int) -> Prompt:
    _require(row, ("ind", "activity_label", "ctx_a", "ctx_b", "endings", "label"),
             "hellaswag", index)
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    text = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in row["endings"]]
    label = str(row["label"]).strip()
    gold = int(label) if label.isdigit() else None  # test split: label is ""
    meta = {"source": "hellaswag", "gold_index": gold, "choices": endings,
            "activity_label": row["activity_label"]}
    if gold is not None:
        meta["answer"] = endings[gold]
    return Prompt(f"hellaswag-{row['ind']}", text, meta)


def _mmlu(row: dict, index: int) -> Prompt:
    _require(row, ("question", "subject", "choices", "answer"), "mmlu", index)
    choices = list(row["choices"])
    if len(choices) != 4:
        raise ValueError(f"mmlu row {index} has {len(choices)} choices, expected 4 (A-D); "
                         "fix: use cais/mmlu or a file in its layout")
    subject = row["subject"]
    header = ("The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\n\n")
    body = row["question"].strip() + "".join(
        f"\n{letter}. {choice}" for letter, choice in zip("ABCD", choices)) + "\nAnswer:"
    gold = int(row["answer"])
    meta = {"source": "mmlu", "subject": subject, "gold_index": gold,
            "answer": "ABCD"[gold], "answer_text": choices[gold], "choices": choices}
    return Prompt(f"mmlu-{index}", header + body, meta)


# Verbatim from lm-evaluation-harness truthfulqa_mc1/mc2 (the QA primer of the TruthfulQA paper).
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _truthfulqa(row: dict, index: int) -> Prompt:
    _require(row, ("question", "mc1_targets"), "truthfulqa", index)
    choices = list(row["mc1_targets"]["choices"])
    labels = [int(x) for x in row["mc1_targets"]["labels"]]
    gold = labels.index(1) if 1 in labels else None
    meta = {"source": "truthfulqa", "gold_index": gold, "choices": choices}
    if gold is not None:
        meta["answer"] = choices[gold]
    text = TRUTHFULQA_PREAMBLE + "\n\nQ: " + row["question"] + "\nA:"
    return Prompt(f"truthfulqa-{index}", text, meta)


def _winogrande(row: dict, index: int) -> Prompt:
    _require(row, ("sentence", "option1", "option2", "answer"), "winogrande", index)
    sentence = row["sentence"]
    blank = sentence.find("_")
    if blank < 0:
        raise ValueError(f"winogrande row {index} has no '_' blank in its sentence "
                         f"{sentence!r}; fix: mark the slot to fill with '_'")
    # Harness "partial evaluation": context = prefix with the option filled in; the model then
    # scores the rest of the sentence.  We keep option1's context as the prompt.
    prefix = sentence[:blank]
    answer = str(row["answer"]).strip()
    meta = {"source": "winogrande", "answer": answer or None,
            "options": [row["option1"], row["option2"]],
            "continuation": sentence[blank + 1:].strip(),
            "text_option2": prefix + row["option2"]}
    return Prompt(f"winogrande-{index}", prefix + row["option1"], meta)


# A WikiText heading line: "= Title =", "= = Section = =", "= = = Sub = = =".
_WIKITEXT_HEADING = re.compile(r"^=(?: =)* (.+?) =(?: =)*$")


def _wikitext(row: dict, index: int) -> Prompt | None:
    _require(row, ("text",), "wikitext", index)
    line = row["text"].strip()
    if not line or _WIKITEXT_HEADING.match(line):
        return None
    return Prompt(f"wikitext-{index}", line, {"source": "wikitext"})


# --------------------------------------------------------------------------------------------
# Benchmark registry, Hugging Face source strings, loading
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Benchmark:
    """A supported benchmark: its Hub dataset, default config and split, accepted names."""

    key: str
    hub_id: str
    config: str | None
    split: str
    aliases: tuple[str, ...]
    convert: Callable[[dict, int], Prompt | None]


BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (
    Benchmark("arc", "allenai/ai2_arc", "ARC-Challenge", "test",
              ("arc", "ai2_arc", "allenai/ai2_arc"), _arc),
    Benchmark("gsm8k", "openai/gsm8k", "main", "test", ("gsm8k", "openai/gsm8k"), _gsm8k),
    Benchmark("hellaswag", "Rowan/hellaswag", None, "validation",
              ("hellaswag", "rowan/hellaswag"), _hellaswag),
    Benchmark("mmlu", "cais/mmlu", "all", "test", ("mmlu", "cais/mmlu"), _mmlu),
    Benchmark("truthfulqa", "truthfulqa/truthful_qa", "multiple_choice", "validation",
              ("truthfulqa", "truthful_qa", "truthfulqa/truthful_qa"), _truthfulqa),
    Benchmark("winogrande", "allenai/winogrande", "winogrande_xl", "validation",
              ("winogrande", "allenai/winogrande"), _winogrande),
    Benchmark("wikitext", "Salesforce/wikitext", "wikitext-2-raw-v1", "test",
              ("wikitext", "salesforce/wikitext"), _wikitext),
)}


def _resolve(name: str) -> tuple[Benchmark, str | None]:
    """Match ``NAME[/CONFIG]`` against the aliases (longest first): (benchmark, config or None)."""
    lowered = name.strip().lower()
    candidates = sorted(((a, b) for b in BENCHMARKS.values() for a in b.aliases),
                        key=lambda ab: -len(ab[0]))
    for alias, bench in candidates:
        if lowered == alias:
            return bench, None
        if lowered.startswith(alias + "/"):
            return bench, name.strip()[len(alias) + 1:] or None
    known = ", ".join(f"{b.key} ({b.hub_id})" for b in BENCHMARKS.values())
    raise ValueError(f"unknown benchmark {name!r}: supported are {known}; fix: use one of "
                     "these names, or export your data to a JSONL file of "
                     '{"id", "text"} lines and pass its path')


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """Split ``"hf:NAME[/CONFIG][:split]"`` into (benchmark key, config or None, split or None).

    ``NAME`` is a benchmark key or Hub id (``mmlu``, ``cais/mmlu``, ``ai2_arc``...); what follows
    it after ``/`` is the config, e.g. ``hf:ai2_arc/ARC-Easy:test``, ``hf:cais/mmlu/anatomy``.
    """
    if not source.startswith("hf:"):
        raise ValueError(f"{source!r} is not a Hugging Face source; fix: write 'hf:NAME[:split]'")
    name, _, split = source[3:].partition(":")
    if not name.strip():
        raise ValueError(f"{source!r} names no dataset; fix: e.g. 'hf:gsm8k' or 'hf:mmlu:test'")
    bench, config = _resolve(name)
    return bench.key, config, (split.strip() or None)


def convert_rows(name: str, rows: Iterable[dict]) -> list[Prompt]:
    """Convert dataset rows (dicts in the benchmark's field layout) to prompts, in order."""
    bench, _ = _resolve(name)
    prompts = (bench.convert(dict(row), i) for i, row in enumerate(rows))
    return [p for p in prompts if p is not None]


def _local_format(files: list[str]) -> str:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts <= {".json", ".jsonl"}:
        return "json"
    if exts == {".parquet"}:
        return "parquet"
    raise ValueError(f"data_files {files} must all be .json/.jsonl or all .parquet; fix: "
                     "convert them to one of these formats")


def load_benchmark(name: str, data_files: str | os.PathLike | Sequence | None = None,
                   split: str | None = None, config: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> list[Prompt]:
    """Load a benchmark with ``datasets.load_dataset`` and convert it to prompts.

    ``name``: a key of :data:`BENCHMARKS` or an alias, optionally ``NAME/CONFIG``.
    ``data_files``: local JSON/JSONL/Parquet file(s) in the dataset's field layout (no Hub);
    without it the Hub dataset ``BENCHMARKS[key].hub_id`` is downloaded (``config`` and
    ``split`` default to the benchmark's).  ``cache_dir`` is passed to ``load_dataset``.
    """
    import datasets  # heavy import, only needed here

    bench, name_config = _resolve(name)
    split = split or bench.split
    if data_files is not None:
        files = [os.fspath(data_files)] if isinstance(data_files, (str, os.PathLike)) \
            else [os.fspath(f) for f in data_files]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"data file(s) not found: {missing}; fix: check the path(s)")
        ds = datasets.load_dataset(_local_format(files), data_files={split: files},
                                   split=split, cache_dir=cache_dir)
    else:
        config = config or name_config or bench.config
        try:
            ds = datasets.load_dataset(bench.hub_id, config, split=split, cache_dir=cache_dir)
        except Exception as exc:  # offline, unknown split/config, hub outage: say what to do
            raise ValueError(
                f"could not load dataset {bench.hub_id} (config {config}, split {split}) from "
                "the Hugging Face Hub (offline?): use a local JSONL file or set "
                f"HF_DATASETS_OFFLINE=1 with a cached copy [{type(exc).__name__}: {exc}]"
            ) from exc
    return convert_rows(bench.key, ds)
