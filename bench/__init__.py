"""Benchmarks: each module prints one JSON object as its last stdout line, with ratios measured in one run."""
