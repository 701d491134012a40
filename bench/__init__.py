"""Benchmarks for postbridge (run them as scripts, e.g. ``python bench/tunnel.py``); not part of the package."""
