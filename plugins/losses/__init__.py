"""Alignment losses: how the clients' feedback becomes the generator's fine-tuning loss."""
