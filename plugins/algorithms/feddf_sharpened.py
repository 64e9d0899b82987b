"""FedDF with sharpened ensemble targets: the baseline that tells the server's knowledge from sharpening.

FedMMKT's ``agreed`` targets are one-hot where the ensemble's top class is the prompt's, so part of
their gain over FedDF may be sharpening alone. This baseline sharpens FedDF's ensemble the same way a
temperature below 1 does, with no prompt: the clients distil ``softmax(mean logits / (T · s))`` with
``s = sharpen`` (``s → 0``: the ensemble's hard argmax). FedMMKT's margin over it is what the prompt
(the server's knowledge of what it asked for) adds.
"""

from __future__ import annotations

from fedmmkt_plugins.algorithms.feddf import FedDF, FedDFConfig
from pydantic import Field


class FedDFSharpenedConfig(FedDFConfig):
    sharpen: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the ensemble's temperature is multiplied by this (1: FedDF itself; smaller: sharper targets)",
    )


class FedDFSharpened(FedDF):
    """FedDF whose ensemble soft labels are sharpened by a temperature below 1 (no prompt knowledge)."""

    Config = FedDFSharpenedConfig
    config: FedDFSharpenedConfig

    def ensemble_temperature(self) -> float:
        return self.config.kd_temperature * self.config.sharpen
