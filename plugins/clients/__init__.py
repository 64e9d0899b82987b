"""Client models: the clients' task models (a small CNN, transformers' ResNet and ViT) and the
torch classifier they build on (``torch_classifier``: training, distillation, the transformers wrapper)."""
