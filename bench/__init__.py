"""Benchmarks: each stage of jiralake against its ceiling, in one run (``make bench``; docs/benchmarks.md).

Not part of the tests: ``python -m bench.run_all [--quick] [--only STAGE]``.
"""
