"""Benchmarks: scripts that run whole recipes, print figures and write JSON to benchmarks/results/."""
