"""Benchmarks run in-process (accuracy of the adaptation policies)."""
