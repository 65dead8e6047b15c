"""Benchmarks: loopback only, bounded in time, each figure next to a baseline measured in
the same run. Not part of the test suite's pass/fail. Run with ``make bench``."""
