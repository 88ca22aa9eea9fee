"""Helpers for tests and benchmarks (random-weight pipelines); never imported by the training path."""
