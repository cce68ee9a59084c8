"""Benchmarks, soak runs and other tools that are not tests (HACKING.md lists
them).  Run each from the repository's root: ``python3 -m tests.tools.NAME``.
"""
