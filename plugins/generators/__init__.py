"""Generators: the server's text-to-image models (Stable Diffusion + LoRA)."""
