"""Control: the generator is fine-tuned exactly as in FedMMKT, but without any client knowledge.

Fine-tuning a diffusion model on its own guided samples sharpens it by itself; only FedMMKT's margin
over this control measures what the clients taught it.
"""

from __future__ import annotations

from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT


class FedMMKTNoFeedback(FedMMKT):
    """FedMMKT whose alignment losses see every synthetic pair as aligned (uniform weights)."""

    client_feedback = False
