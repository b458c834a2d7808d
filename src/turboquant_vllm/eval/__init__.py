"""Evaluation helpers: real text and a real small model for quality checks and benchmarks."""
