"""Deterministic English-ish training text for the project's tiny causal LM.

The text comes only from things that ship with Python or that this module generates:

1. the docstrings and ``#`` comments of the Python standard library's ``.py`` files, read
   from ``sysconfig.get_paths()["stdlib"]`` in sorted path order (``site-packages`` and test
   folders skipped), one document per file, docstrings and comment paragraphs in source order;
2. short templated sentences (capitals, arithmetic, counting) generated from a seeded RNG,
   so that prompts like "What is the capital of France? The capital is" are in-distribution.

Conventions: a *document* is a ``str``; documents are later joined with ``<|endoftext|>``.
A file goes to the held-out split when ``crc32(relative path) % HELDOUT_MODULUS == 0``, so
the split does not depend on the character limit or on which other files exist.

Run ``python3 -m coupling.experiments.study.corpus --max-chars 200000`` to print a summary.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import os
import random
import sys
import sysconfig
import tokenize
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HELDOUT_MODULUS = 25  # ~4% of stdlib files are held out for evaluation
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_COMMENT_WORDS = 4  # drop "# noqa"-style comments: they teach the model nothing

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"),
    ("Australia", "Canberra"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("Morocco", "Rabat"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve"]


@dataclass
class Corpus:
    """Train and held-out documents plus a description for provenance records."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    n_files: int = 0

    @property
    def train_chars(self) -> int:
        return sum(map(len, self.train))

    @property
    def heldout_chars(self) -> int:
        return sum(map(len, self.heldout))

    def sha256(self) -> str:
        """Digest of both splits, so a run can be matched to its exact text."""
        h = hashlib.sha256()
        for doc in self.train + ["\0HELDOUT\0"] + self.heldout:
            h.update(doc.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "sources": "docstrings and comments of the Python standard library (.py files "
                       "under sysconfig stdlib, sorted, site-packages/test dirs skipped) "
                       "+ generated templated sentences (capitals, arithmetic, counting)",
            "python_version": sys.version.split()[0],
            "stdlib_files_used": self.n_files,
            "train_docs": len(self.train),
            "train_chars": self.train_chars,
            "heldout_docs": len(self.heldout),
            "heldout_chars": self.heldout_chars,
            "heldout_rule": f"crc32(relative path) % {HELDOUT_MODULUS} == 0",
            "sha256": self.sha256(),
        }


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, skipping third-party and test folders."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        # prune in place: site-packages alone can hold tens of thousands of files
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, cleaned docstring) for the module and every class/function in ``tree``."""
    out = []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body:
                out.append((node.body[0].lineno, doc))
    return out


def _comments(source: str) -> list[tuple[int, str]]:
    """(line, paragraph) for runs of consecutive ``#`` comment lines."""
    out, run, start, last = [], [], 0, -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            text = tok.string.lstrip("#!").strip()
            if line != last + 1 and run:
                out.append((start, " ".join(run)))
                run = []
            if not run:
                start = line
            if text:
                run.append(text)
            last = line
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass  # keep what was read before the bad token
    if run:
        out.append((start, " ".join(run)))
    return [(ln, p) for ln, p in out if len(p.split()) >= MIN_COMMENT_WORDS]


def file_document(path: Path) -> str:
    """Docstrings and comment paragraphs of one source file, in source order ('' if none)."""
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    pieces = sorted(_docstrings(tree) + _comments(source), key=lambda lp: lp[0])
    # non-ASCII paragraphs are mostly codec tables and author names: not worth vocab slots
    return "\n\n".join(p for _, p in pieces if p.isascii()).strip()


def generated_documents(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` short documents of templated facts, reproducible from ``seed``."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(4, 10)):
            kind = rng.random()
            if kind < 0.5:
                country, city = rng.choice(CAPITALS)
                lines.append(rng.choice([
                    f"What is the capital of {country}? The capital is {city}.",
                    f"The capital of {country} is {city}.",
                    f"{city} is the capital city of {country}.",
                ]))
            elif kind < 0.8:
                a, b = rng.randint(0, 20), rng.randint(0, 20)
                lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
            else:
                k = rng.randint(0, 8)
                lines.append("Count: " + ", ".join(NUMBER_WORDS[k:k + 5]) + ".")
        docs.append(" ".join(lines))
    return docs


def build_corpus(max_chars: int = 8_000_000, seed: int = 0, generated_fraction: float = 0.05,
                 root: Path | None = None) -> Corpus:
    """Read stdlib files in sorted order until about ``max_chars`` of training text is collected.

    The stdlib part stops at ``(1 - generated_fraction) * max_chars`` characters (the whole
    standard library gives ~3.6 MB, so the default takes all of it); generated sentences then
    make up ``generated_fraction`` of the total. Held-out text is capped at ``max_chars // 20``
    characters. Fully deterministic for a given Python installation, ``max_chars`` and ``seed``.
    """
    if max_chars < 1000:
        raise ValueError(f"max_chars={max_chars} is too small; use at least 1000 characters")
    if not 0.0 <= generated_fraction < 1.0:
        raise ValueError(f"generated_fraction={generated_fraction} must lie in [0, 1)")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    corpus = Corpus()
    stdlib_budget = int(max_chars * (1 - generated_fraction))
    heldout_budget = max_chars // 20
    for path in stdlib_files(root):
        if corpus.train_chars >= stdlib_budget:
            break
        doc = file_document(path)
        if not doc:
            continue
        corpus.n_files += 1
        rel = path.relative_to(root).as_posix()
        # the last document of each split is cut so the limits hold
        if zlib.crc32(rel.encode()) % HELDOUT_MODULUS == 0:
            if corpus.heldout_chars < heldout_budget:
                corpus.heldout.append(doc[:heldout_budget - corpus.heldout_chars])
        else:
            corpus.train.append(doc[:stdlib_budget - corpus.train_chars])
    # sized against the stdlib text actually read (all of it is ~3.6 MB);
    # ~300 characters per generated document; 1 in 20 is held out like the files
    stdlib_chars = corpus.train_chars + corpus.heldout_chars
    n_gen = max(2, int(stdlib_chars * generated_fraction / (1 - generated_fraction) / 300))
    for i, doc in enumerate(generated_documents(n_gen, seed)):
        (corpus.heldout if i % 20 == 0 else corpus.train).append(doc)
    return corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-chars", type=int, default=8_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=600, help="characters of text to print")
    args = ap.parse_args()
    corpus = build_corpus(args.max_chars, args.seed)
    for k, v in corpus.describe().items():
        print(f"{k}: {v}")
    print("----\n" + corpus.train[0][: args.show])


if __name__ == "__main__":
    main()
