"""Evaluation helpers the algorithms use: the evaluation oracle (CAS, Frechet distance) and sample grids."""
