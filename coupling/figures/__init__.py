"""The figures of finished scans (coupling report) and of checkpoint series.

May import: coupling.results and below.
"""
