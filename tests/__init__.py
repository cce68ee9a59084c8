"""epmd.py's tests (pytest; see tests/conftest.py and tests/helpers.py).

A package so that the tools under tests/tools/ run from the repository's root
as ``python3 -m tests.tools.NAME`` and import ``tests.helpers``; the test
modules themselves import ``helpers`` (pyproject.toml puts tests/ on pytest's
path).
"""
