"""Loggers: where metrics go (console, CSV, TensorBoard, MLflow)."""
