"""Ablation: FedMMKT with the generator never updated (knowledge flows server -> clients only)."""

from __future__ import annotations

from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT


class FedMMKTFrozenGenerator(FedMMKT):
    """Everything FedMMKT does except the generator's fine-tuning."""

    update_generator = False
