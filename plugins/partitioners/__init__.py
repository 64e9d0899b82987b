"""Partitioners: how a dataset is split across simulated clients (IID, Dirichlet, shards)."""
