"""Benchmarks: figures and ratios on a throwaway cluster, never pass/fail timings."""
