"""Experiments built on scans: benchmark correlation, checkpoint series, perturbation, prompt analysis and the controlled study.

May import: coupling.scan and everything below it (never coupling.cli).
"""
