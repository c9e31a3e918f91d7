"""Every setting, listed once (the schema), and the per-prompt ScanSettings built from it.

May import: coupling.errors; ScanSettings' checks import coupling.model and coupling.spectrum (schema.py: standard library only).
"""
