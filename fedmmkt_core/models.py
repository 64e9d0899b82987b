"""Client models as a recipe names them: shared by both sides, since a model without data is no secret.

The client side builds its own model here; the server side builds an untrained model of a client's
architecture (FedAvg's global weights, the centralized upper bound) through
``ServerContext.build_client_model``. Neither holds any client data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmmkt_core.data import TaskSpec
from fedmmkt_core.interfaces import ClientModel
from fedmmkt_core.seeding import derive_seed

if TYPE_CHECKING:
    from fedmmkt_core.recipe import Recipe


def build_client_model(recipe: Recipe, task: TaskSpec, client_id: int) -> ClientModel:
    """Instantiate and build client ``client_id``'s model with its initial weights."""
    group = recipe.client_groups()[client_id]
    model = recipe.build("client_model", group)
    assert isinstance(model, ClientModel)
    model.build(task, seed=derive_seed(recipe.seed, "init", client_id))
    return model
