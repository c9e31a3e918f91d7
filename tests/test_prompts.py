"""Tests for coupling.prompts.sources: built-in set, JSONL files, benchmark converters, tokenization."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from coupling.prompts.benchmarks import (BENCHMARKS, TRUTHFULQA_PREAMBLE, convert_rows,
                                         hellaswag_preprocess, load_benchmark, parse_hf_source)
from coupling.prompts.jsonl import Prompt
from coupling.prompts.sources import load_prompts, tokenize_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ built-in set

def test_builtin_set_contents():
    prompts = load_prompts("builtin")
    assert len(prompts) >= 60
    assert prompts[0] == Prompt("capital_france", "What is the capital of France? The capital is",
                                {"kind": "factual", "source": "builtin"})
    assert len({p.id for p in prompts}) == len(prompts)
    kinds = Counter(p.meta["kind"] for p in prompts)
    assert set(kinds) == {"factual", "arithmetic", "code", "instruction", "narrative", "list",
                          "dialogue", "definition", "multiple_choice"}
    words = [len(p.text.split()) for p in prompts]
    assert min(words) <= 6 and max(words) >= 70 and max(words) <= 85


def test_builtin_file_has_exactly_id_text_kind():
    path = Path(__file__).parents[1] / "coupling" / "data" / "prompts_builtin.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "text", "kind"} for r in rows)


def test_max_prompts_and_seed_are_deterministic():
    full = load_prompts("builtin")
    assert [p.id for p in load_prompts("builtin", max_prompts=5)] == [p.id for p in full[:5]]
    a = load_prompts("builtin", max_prompts=10, seed=3)
    b = load_prompts("builtin", max_prompts=10, seed=3)
    c = load_prompts("builtin", max_prompts=10, seed=4)
    assert [p.id for p in a] == [p.id for p in b] != [p.id for p in c]
    # the shuffle is a permutation: with no cap every prompt comes back once
    assert sorted(p.id for p in load_prompts("builtin", seed=3)) == sorted(p.id for p in full)
    assert len(load_prompts("builtin", max_prompts=1000)) == len(full)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_prompts(bad):
    with pytest.raises(ValueError, match="max_prompts"):
        load_prompts("builtin", max_prompts=bad)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown prompt source 'prompts.txt'.*builtin"):
        load_prompts("prompts.txt")
    with pytest.raises(ValueError, match="not found"):
        load_prompts("/nonexistent/dir/p.jsonl")


# ------------------------------------------------------------------ JSONL files

def test_jsonl_ids_meta_and_generated_ids(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        '{"id": "a", "text": "Hello there", "difficulty": 0.7, "kind": "greeting"}',
        "",
        '{"text": "No id on this line"}',
        '{"id": 42, "text": "Numeric id"}',
    ])
    prompts = load_prompts(str(path))
    assert [p.id for p in prompts] == ["a", "line-3", "42"]
    assert prompts[0].text == "Hello there"
    assert prompts[0].meta == {"difficulty": 0.7, "kind": "greeting", "source": str(path)}
    assert prompts[1].meta == {"source": str(path)}


@pytest.mark.parametrize("lines, line_no, message", [
    (['{"id": "a", "text": "ok"}', '{"id": "b", "text": "ok" '], 2, "invalid JSON"),
    (['{"id": "a"}'], 1, "missing 'text'"),
    (['{"id": "a", "text": "ok"}', '{"id": "b", "text": "   "}'], 2, "'text' is empty"),
    (['{"id": "a", "text": 3}'], 1, "'text' is empty or not a string"),
    (['["a", "b"]'], 1, "expected a JSON object"),
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"}', '{"id": "a", "text": "z"}'], 3,
     r"duplicate id 'a' \(first on line 1\)"),
    (['{"id": ["x"], "text": "y"}'], 1, "'id' must be a non-empty string"),
])
def test_jsonl_errors_name_file_line_and_fix(tmp_path, lines, line_no, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line {line_no}: {message}.*fix:"):
        load_prompts(str(path))


def test_jsonl_empty_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(path))


# ------------------------------------------------------------------ benchmark converters

def load_fixture(name: str, tmp_path, **kw):
    return load_benchmark(name, data_files=FIXTURES / f"{name}.jsonl",
                          cache_dir=tmp_path / "hf_cache", **kw)


def test_arc(tmp_path):
    prompts = load_fixture("arc", tmp_path)
    assert [p.id for p in prompts] == ["arc-Fixture_7000001", "arc-Fixture_7000002",
                                       "arc-Fixture_7000003"]
    assert prompts[0].text == ("Question: Which tool is best for measuring the mass of a small "
                               "rock?\nAnswer:")
    assert prompts[0].meta["answer"] == "B" and prompts[0].meta["answer_text"] == "a balance"
    # numeric labels ("1","2","3") as some ARC items have
    assert prompts[2].meta["gold_index"] == 1 and prompts[2].meta["answer_text"] == "wind"


def test_gsm8k(tmp_path):
    prompts = load_fixture("gsm8k", tmp_path)
    assert [p.id for p in prompts] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert prompts[1].text == ("Question: A farmer collects 48 eggs and packs them in cartons of "
                               "6. How many cartons does he fill?\nAnswer:")
    assert [p.meta["answer"] for p in prompts] == ["14", "8", "1200"]
    assert prompts[1].meta["solution"].endswith("#### 8")


def test_hellaswag(tmp_path):
    prompts = load_fixture("hellaswag", tmp_path)
    assert [p.id for p in prompts] == ["hellaswag-14", "hellaswag-27", "hellaswag-40"]
    assert prompts[0].text == ("Washing dishes: A man stands at a kitchen sink filled with soapy "
                               "water. The man picks up a plate and")
    # WikiHow item: " [title]" -> ". ", tags dropped, double spaces collapsed, trailing space
    # from the empty ctx_b stripped
    assert prompts[1].text == ("Home and Garden: How to repot a basil plant. Choose a slightly "
                               "larger pot. The new pot should have drainage holes in the bottom.")
    # str.capitalize() lower-cases the rest of ctx_b, exactly as the harness does
    assert prompts[2].text == ("Playing violin: A girl named Ana stands on a stage holding a "
                               "violin. She lifts the bow while ana's teacher")
    assert prompts[1].meta["gold_index"] == 0
    assert prompts[1].meta["answer"] == " Fill the bottom of the new pot with fresh potting soil."


def test_hellaswag_preprocess_known_cases():
    assert hellaswag_preprocess("  a [title] b [step] c ") == "a. b c"
    assert hellaswag_preprocess("x [header] y") == "x y"


def test_mmlu(tmp_path):
    prompts = load_fixture("mmlu", tmp_path)
    assert [p.id for p in prompts] == ["mmlu-0", "mmlu-1", "mmlu-2"]
    assert prompts[0].text == (
        "The following are multiple choice questions (with answers) about high school "
        "mathematics.\n\n"
        "What is the derivative of x^3 with respect to x?\nA. x^2\nB. 3x^2\nC. 3x\nD. x^4/4\n"
        "Answer:")
    # question whitespace is stripped (harness: question.strip())
    assert prompts[2].text.endswith("computer science.\n\nIn a stack, which operation removes the "
                                    "most recently added element?\nA. enqueue\nB. pop\nC. peek\n"
                                    "D. push\nAnswer:")
    assert prompts[1].meta["answer"] == "C" and prompts[1].meta["answer_text"] == "Mitochondrion"
    assert prompts[1].meta["subject"] == "college_biology"


def test_truthfulqa(tmp_path):
    prompts = load_fixture("truthfulqa", tmp_path)
    assert [p.id for p in prompts] == ["truthfulqa-0", "truthfulqa-1", "truthfulqa-2"]
    assert prompts[1].text == (
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
        "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
        "Q: What colour is the blood inside human veins?\nA:")
    assert TRUTHFULQA_PREAMBLE.count("\nA: ") == 6
    assert prompts[1].meta["answer"] == "It is red."


def test_winogrande(tmp_path):
    prompts = load_fixture("winogrande", tmp_path)
    assert [p.id for p in prompts] == ["winogrande-0", "winogrande-1", "winogrande-2"]
    assert prompts[0].text == "The bottle would not fit into the backpack because the bottle"
    assert prompts[1].text == "Maya lent her umbrella to Jordan because Maya"
    assert prompts[1].meta["text_option2"] == "Maya lent her umbrella to Jordan because Jordan"
    assert prompts[1].meta["continuation"] == "was about to walk home in the rain."
    assert prompts[1].meta["answer"] == "2"


def test_wikitext_skips_blank_and_heading_lines(tmp_path):
    prompts = load_fixture("wikitext", tmp_path)
    assert [p.id for p in prompts] == ["wikitext-3", "wikitext-7", "wikitext-11"]
    assert prompts[2].text == ("Four families kept the light between 1871 and 1962 , when the "
                               "lamp was automated .")
    assert not any(p.text.startswith("=") for p in prompts)


def test_parquet_copy_gives_same_prompts(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in (FIXTURES / "mmlu.jsonl").read_text().splitlines()]
    parquet = tmp_path / "mmlu.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    from_parquet = load_benchmark("cais/mmlu", data_files=str(parquet),
                                  cache_dir=tmp_path / "hf_cache")
    assert from_parquet == load_fixture("mmlu", tmp_path)


def test_every_benchmark_has_a_fixture(tmp_path):
    for key in BENCHMARKS:
        assert len(load_fixture(key, tmp_path)) == 3


def test_wrong_layout_names_missing_fields():
    with pytest.raises(ValueError, match=r"gsm8k row 0 lacks field\(s\) \['question'\]"):
        convert_rows("gsm8k", [{"problem": "1+1", "answer": "#### 2"}])
    with pytest.raises(ValueError, match="no '_' blank"):
        convert_rows("winogrande", [{"sentence": "No blank.", "option1": "a", "option2": "b",
                                     "answer": "1"}])


def test_local_files_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_benchmark("arc", data_files=tmp_path / "missing.jsonl")
    csv = tmp_path / "arc.csv"
    csv.write_text("id,question\n")
    with pytest.raises(ValueError, match=r"\.json/\.jsonl or all \.parquet"):
        load_benchmark("arc", data_files=[csv])


# ------------------------------------------------------------------ hf: sources

@pytest.mark.parametrize("source, expected", [
    ("hf:gsm8k", ("gsm8k", None, None)),
    ("hf:mmlu:test", ("mmlu", None, "test")),
    ("hf:cais/mmlu", ("mmlu", None, None)),
    ("hf:cais/mmlu/abstract_algebra:dev", ("mmlu", "abstract_algebra", "dev")),
    ("hf:ai2_arc/ARC-Easy:test", ("arc", "ARC-Easy", "test")),
    ("hf:allenai/ai2_arc:validation", ("arc", None, "validation")),
    ("hf:truthful_qa/multiple_choice:validation", ("truthfulqa", "multiple_choice", "validation")),
    ("hf:wikitext/wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test")),
    ("hf:Rowan/hellaswag", ("hellaswag", None, None)),
])
def test_parse_hf_source(source, expected):
    assert parse_hf_source(source) == expected


def test_parse_hf_source_unknown():
    with pytest.raises(ValueError, match="unknown benchmark 'squad'.*gsm8k"):
        parse_hf_source("hf:squad:validation")
    with pytest.raises(ValueError, match="names no dataset"):
        parse_hf_source("hf::test")


def test_hub_offline_error_is_clear(monkeypatch, tmp_path):
    # Force the Hub client's offline mode (no network in tests) and run the real hub code path.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(ValueError, match=r"could not load dataset openai/gsm8k .*from the "
                       r"Hugging Face Hub \(offline\?\): use a local JSONL file or set "
                       r"HF_DATASETS_OFFLINE"):
        load_prompts("hf:gsm8k:test", max_prompts=3)


# ------------------------------------------------------------------ tokenization

def make_tokenizer(with_bos: bool):
    """A WordLevel tokenizer trained here; lower-cases and drops every non-letter."""
    from tokenizers import (Regex, Tokenizer, models, normalizers, pre_tokenizers, processors,
                            trainers)
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                           normalizers.Replace(Regex(r"[^a-z\s]"), "")])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the bone"],
                            trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    kwargs = {"unk_token": "[UNK]"}
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
        kwargs["bos_token"] = "[BOS]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs), tok.get_vocab()


def test_tokenize_prompt_ids_and_special_tokens():
    plain, vocab = make_tokenizer(with_bos=False)
    ids = tokenize_prompt(plain, "The cat sat!")
    assert ids.shape == (1, 3) and ids.dtype == torch.long
    assert ids.tolist() == [[vocab["the"], vocab["cat"], vocab["sat"]]]
    # the tokenizer's default add_special_tokens=True is kept: BOS is prepended
    with_bos, vocab = make_tokenizer(with_bos=True)
    ids = tokenize_prompt(with_bos, Prompt("p1", "the dog zebra"))
    assert ids.tolist() == [[vocab["[BOS]"], vocab["the"], vocab["dog"], vocab["[UNK]"]]]


def test_tokenize_prompt_errors():
    plain, _ = make_tokenizer(with_bos=False)
    with pytest.raises(ValueError, match="prompt blank is empty"):
        tokenize_prompt(plain, Prompt("blank", "  \n"))
    # non-blank text whose every character the normalizer removes -> 0 tokens
    with pytest.raises(ValueError, match="prompt digits is empty after tokenization"):
        tokenize_prompt(plain, "1234 ###", prompt_id="digits")
    with pytest.raises(ValueError, match=r"prompt long has 5 tokens, more than the model's "
                       r"context of 4: use a shorter prompt or truncate with --max-tokens"):
        tokenize_prompt(plain, Prompt("long", "the cat sat on mat"), max_length=4)
    assert tokenize_prompt(plain, "the cat sat on mat", max_length=5).shape == (1, 5)
