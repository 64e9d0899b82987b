"""Algorithms: what the server does each round (FedMMKT, its controls and ablations, the baselines)."""
