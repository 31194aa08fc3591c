"""Benchmarking: prompts, the side-by-side harness, reports, the pipelined sweep, charts."""
