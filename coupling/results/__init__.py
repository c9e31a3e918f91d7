"""What a scan writes: result shards as it goes (resume), the output folder, and the marker that says what the project owns.

May import: coupling.analysis and below.
"""
