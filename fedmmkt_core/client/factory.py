"""Building a client from a recipe: client ``k``'s runtime holding only client ``k``'s data.

The client side's entry point for every backend (the in-process backend for each simulated client,
Flower's ClientApp on its node), and ``fedmmkt partition``'s writer of per-client folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmmkt_core.client.folder import ClientFolder, read_client_folder, write_client_folder
from fedmmkt_core.client.runtime import CLIENT_SECRET_ENV, ClientRuntime
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError, UserError
from fedmmkt_core.interfaces import ClientModel
from fedmmkt_core.models import build_client_model
from fedmmkt_core.privacy import PrivacyLedger, SitePrivacy, SoftLabelPrivacy

if TYPE_CHECKING:
    from fedmmkt_core.recipe import Recipe


class ClientFactory:
    """The client side of a recipe: builds client ``k``'s runtime holding only client ``k``'s data.

    Every backend builds its clients here (the in-process backend for each simulated client, Flower's
    ClientApp on its node). In a simulation the recipe's one dataset is loaded on this machine and each
    client's partition cut from it (deterministic for the recipe's seed); nothing here is reachable
    from the server side of a run.

    With ``data_root`` (a folder written by ``fedmmkt partition``, or a site's own data in that layout,
    see :mod:`fedmmkt_core.client.folder`) the client reads only that folder: its training share, the
    shared evaluation split and the task; the recipe's dataset is never loaded.
    """

    def __init__(
        self,
        recipe: Recipe,
        secret: str | None = None,
        data_root: Path | None = None,
        privacy: SoftLabelPrivacy | None = None,
        site: SitePrivacy | None = None,
    ):
        """``privacy``: the recipe's DP settings (default: its section; a Flower node gets them next to
        its recipe, which names no algorithm that uploads soft labels). ``site``: the site's own
        (default: from this process's environment, :class:`~fedmmkt_core.privacy.SitePrivacy`); a
        client runs under the stricter of the two."""
        self.recipe = recipe
        self.privacy = privacy if privacy is not None else recipe.privacy
        self.site = site if site is not None else SitePrivacy.read()
        self.secret = secret if secret is not None else os.environ.get(CLIENT_SECRET_ENV) or None
        self.data_root = Path(data_root) if data_root is not None else None
        self._data: tuple[ImageSet, ImageSet, TaskSpec, list[np.ndarray] | None] | None = None
        self._folder: ClientFolder | None = None

    def _load(self) -> tuple[ImageSet, ImageSet, TaskSpec, list[np.ndarray] | None]:
        """The recipe's dataset, cut (never with ``data_root``: that folder holds all a node needs)."""
        assert self.data_root is None, "a client with a data folder never loads the recipe's dataset"
        if self._data is None:
            from fedmmkt_core.loading import evaluation_split, load_splits, partition

            splits = load_splits(self.recipe)
            parts = partition(self.recipe, splits.train.labels)
            self._data = (splits.train, evaluation_split(self.recipe, splits), splits.task, parts)
        return self._data

    def folder(self) -> ClientFolder:
        """The ``data_root`` folder as read (``ClientFolder``), checked against the recipe's client count
        and ``data.evaluate_on`` (its task is checked against the server's by :meth:`check_task`)."""
        if self._folder is None:
            assert self.data_root is not None
            folder = read_client_folder(self.data_root)
            if folder.num_clients != self.recipe.num_clients:
                raise DataError(
                    f"{self.data_root} was written for {folder.num_clients} clients, the recipe has "
                    f"{self.recipe.num_clients}"
                )
            if folder.evaluate_on != self.recipe.data.evaluate_on:
                raise DataError(
                    f"{self.data_root} holds the {folder.evaluate_on} split for evaluation, the recipe evaluates "
                    f"on {self.recipe.data.evaluate_on} (data.evaluate_on): write the folder again with "
                    "`fedmmkt partition`"
                )
            self._folder = folder
        return self._folder

    def check_task(self, task: TaskSpec) -> None:
        """With ``data_root``: DataError when the folder's classes or geometry differ from ``task`` (the server's)."""
        if self.data_root is not None:
            self.folder().check_task(task, self.data_root)

    @property
    def task(self) -> TaskSpec:
        return self.folder().task if self.data_root is not None else self._load()[2]

    def evaluation_data(self) -> ImageSet:
        """The split every client is evaluated on: from ``data_root``, or the recipe's dataset."""
        return self.folder().evaluation if self.data_root is not None else self._load()[1]

    def train_data(self, client_id: int) -> ImageSet:
        """Client ``client_id``'s training data: its ``data_root`` folder, or its share of the recipe's dataset."""
        if not 0 <= client_id < self.recipe.num_clients:
            raise ValueError(f"client id {client_id} outside 0..{self.recipe.num_clients - 1}")
        if self.data_root is not None:
            folder = self.folder()
            if folder.client_id != client_id:
                raise DataError(f"{self.data_root} holds client {folder.client_id}'s data, not client {client_id}'s")
            return folder.train
        train, _, _, parts = self._load()
        assert parts is not None
        return train.subset(parts[client_id])

    def build_model(self, client_id: int) -> ClientModel:
        """Client ``client_id``'s model with its initial weights (architecture from the recipe)."""
        return build_client_model(self.recipe, self.task, client_id)

    def build(
        self, client_id: int, model: ClientModel | None = None, ledger: PrivacyLedger | None = None
    ) -> ClientRuntime:
        """Client ``client_id``'s runtime; ``ledger``: its privacy ledger, kept with its state."""
        train = self.train_data(client_id)
        evaluation, task = self.evaluation_data(), self.task
        model = model if model is not None else self.build_model(client_id)
        fault = self.recipe.client_groups()[client_id].fault
        return ClientRuntime(
            client_id,
            model,
            train,
            evaluation,
            task,
            fault=fault,
            privacy=self.site.apply(self.privacy),
            secret=self.secret,
            ledger=ledger,
            class_mean_floor=self.site.class_mean_min_images,
        )


def write_partition(recipe: Recipe, out: Path) -> list[Path]:
    """Write ``out/client_K`` for every client of ``recipe``: exactly its share as ClientFactory cuts it, and
    the evaluation split (``data.evaluate_on``) every client is evaluated on."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"partition folder {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: give a new folder")
    factory = ClientFactory(recipe)
    source = {"recipe": recipe.name, "seed": recipe.seed, "dataset": recipe.data.dataset.name}
    folders = []
    for client_id in range(recipe.num_clients):
        folder = out / f"client_{client_id}"
        write_client_folder(
            folder,
            client_id,
            recipe.num_clients,
            factory.train_data(client_id),
            factory.task,
            source,
            evaluation=factory.evaluation_data(),
            evaluate_on=recipe.data.evaluate_on,
        )
        folders.append(folder)
    return folders
