"""Benchmarks run on demand (not in CI): accuracy, feature extraction, training, inference.

Run them as ``python bench/<name>.py`` from the repository root; ``python bench/report.py``
turns their JSON results (``bench/results/``) into tables and the README section.
"""
