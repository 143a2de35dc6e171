"""Helpers for tests, benchmarks and the offline demo."""
