"""Backends: how messages reach clients (in-process simulation, Flower)."""
