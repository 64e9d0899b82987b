"""Aggregators: how the server combines the clients' soft labels into distillation targets."""
