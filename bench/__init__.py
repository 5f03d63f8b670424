"""Benchmarks: each runs alone (``python -m bench.<name>``) and prints its figures."""
