"""Prompt sources: the built-in set, JSONL files and benchmark test sets, tokenized for a model.

May import: coupling.errors only.
"""
