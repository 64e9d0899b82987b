"""The extension kinds. The round loop talks only to these abstract classes.

Every component has a typed ``Config`` (a pydantic model that forbids unknown keys) which the recipe's
``params`` are validated against. Constructors are cheap; heavy work (importing torch, building
networks, loading data) happens in the kind-specific set-up method, so listing and validating plugins
stays instant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from .data import DataSplits, DistillSet, ImageSet, TaskSpec, class_index_map
from .errors import ClientFailure, DataError, RecipeIssue

if TYPE_CHECKING:
    from fedmmkt_core.server.context import ServerContext
    from fedmmkt_core.server.runner import Runner

    from .recipe import Recipe
    from .wire import Message


Progress = Callable[[str, int, int], None]
"""``progress(task, completed, total)``: long work (pre-training...) reports how far it got."""


class ComponentConfig(BaseModel):
    """Base of every component's config: unknown keys are errors, never silent defaults."""

    model_config = ConfigDict(extra="forbid")


class Component(ABC):
    """Base of all extension kinds."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    #: the name the recipe selected this component by (set by ``Recipe.build``; metrics use it)
    registered_name: str = ""

    def __init__(self, config: ComponentConfig | None = None):
        self.config = config if config is not None else self.Config()

    def generator_requirements(self) -> dict[str, str]:
        """Generator capabilities this component, as configured, relies on: ``{capability: reason}``.

        ``fedmmkt validate`` checks them against the recipe's generator's :meth:`Generator.capabilities`
        (e.g. FedMMKT with ``base_fraction > 0`` needs ``generate_base``). The reason names the setting,
        relative to the component (``"params.base_fraction"``), or is ``""``.
        """
        return {}

    @classmethod
    def check_recipe(cls, recipe: Recipe, path: str) -> list[RecipeIssue]:
        """Cross-field checks on the whole recipe (e.g. FedAvg needs one client architecture).

        ``path`` is where this component sits in the recipe, for error messages.
        """
        return []


class Dataset(Component):
    """Loads a dataset and cuts it into the protocol's splits."""

    kind = "dataset"

    @abstractmethod
    def load(self, seed: int) -> DataSplits:
        """Return the splits; the same seed must give the same splits on every machine."""

    def class_names(self) -> tuple[str, ...] | None:
        """The class names :meth:`load` would give, found without loading any image (a folder listing, a
        header), or None when that needs the data. ``fedmmkt validate`` compares ``data.public``'s with the
        clients' dataset's (matched by name, in any order); a :class:`DataError` here is left to :meth:`load`."""
        return None

    @classmethod
    def check_recipe(cls, recipe: Recipe, path: str) -> list[RecipeIssue]:
        """As ``data.public``: its classes, when both datasets list them without loading, are the clients'."""
        if path != "data.public" or recipe.data.public is None:
            return []
        names: dict[str, tuple[str, ...] | None] = {}
        for where, spec in (("data.dataset", recipe.data.dataset), (path, recipe.data.public)):
            try:
                names[where] = recipe.build("dataset", spec).class_names()
            except (DataError, OSError):  # unreadable here (a client's node holds no public data): loading reports it
                return []
        if names["data.dataset"] is None or names[path] is None:
            return []
        try:
            class_index_map(names[path], names["data.dataset"], f"data.public ('{recipe.data.public.name}')")
        except DataError as exc:
            return [RecipeIssue(path, str(exc))]
        return []


class Partitioner(Component):
    """Spreads the training split's samples over the clients."""

    kind = "partitioner"

    @abstractmethod
    def partition(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Return one array of sample indices per client."""

    def checked_partition(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        """:meth:`partition`, then check every client got samples and no sample went twice."""
        if num_clients > len(labels):
            raise DataError(f"{num_clients} clients but only {len(labels)} training samples: use fewer clients")
        parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in self.partition(labels, num_clients, rng)]
        if len(parts) != num_clients:
            raise DataError(f"partitioner returned {len(parts)} parts for {num_clients} clients")
        joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
        if len(np.unique(joined)) != len(joined):
            raise DataError("partitioner gave the same sample to more than one client")
        if len(joined) and (joined.min() < 0 or joined.max() >= len(labels)):
            raise DataError("partitioner returned indices outside the training split")
        empty = [k for k, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise DataError(f"clients {empty} got no training samples: use fewer clients or another partition")
        return parts


class ClientModel(Component):
    """A client's private task model and its local training.

    Lifecycle: ``build(task, seed)`` once, then any of ``fit``, ``predict_logits``,
    ``get_weights``/``set_weights``. The weights are all a client keeps between rounds.
    """

    kind = "client_model"

    @abstractmethod
    def build(self, task: TaskSpec, seed: int) -> None:
        """Create the network with freshly initialised (or pre-trained) weights."""

    @abstractmethod
    def fit(self, train: ImageSet, distill: DistillSet | None, seed: int) -> dict[str, float]:
        """One round of local training: cross-entropy on ``train`` plus, when given, KD towards
        ``distill``'s soft labels. Returns finite training metrics (at least ``loss``).

        The KD contract (:class:`~fedmmkt_core.data.DistillSet`): ``soft_labels`` are probability rows
        (each sums to one) exactly as the aggregator produced them — they are *not* softened again by
        the temperature. With ``T = distill.temperature`` the expected term is
        ``distill.weight * T² * KL(soft_labels || softmax(student_logits / T))``, averaged over the
        distillation batch: the student is softened by T, and T² keeps the gradient's size independent
        of T. ``fedmmkt_plugins.clients.torch_classifier.TorchClassifier`` implements exactly this.
        """

    @abstractmethod
    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``float32 [N, num_classes]`` for uint8 images ``[N, H, W, C]``."""

    def inversion_deltas(
        self, images: np.ndarray, class_ids: np.ndarray, steps: int, step_size: float, seed: int
    ) -> np.ndarray:
        """Optional: how this model would change each image to look more like its class and like this
        client's data (the inversion feedback of ``fedmmkt``'s ``inversion_steps``).

        ``images`` uint8 ``[N, H, W, C]``, ``class_ids`` int ``[N]`` (the class each was generated for).
        Returns float32 ``[N, H, W, C]`` in the [-1, 1] image scale: the total change after ``steps``
        steps of at most ``step_size / steps`` root-mean-square each, so every value lies within
        ``[-2, 2]``. Must not change the model. A model that cannot (this default) raises
        ``NotImplementedError`` and its client uploads no deltas."""
        raise NotImplementedError(f"{type(self).__name__} computes no inversion deltas")

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """Every tensor the model needs to be restored, as numpy arrays."""

    @abstractmethod
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`get_weights` output (strict: missing or extra keys are errors)."""


@dataclass
class ClientReply:
    """One client's answer about the synthetic set: logits, and how much data stands behind them."""

    client_id: int
    logits: np.ndarray
    num_samples: int
    class_counts: np.ndarray | None = None


class Aggregator(Component):
    """Turns the clients' logits on the synthetic set into the federation's soft labels.

    A pure function of (round, replies), so it can be tested with numbers computed by hand. A robust
    aggregator that leaves clients out lists their ids in ``excluded`` (reported as ``kd_excluded``).
    """

    kind = "aggregator"
    excluded: Sequence[int] = ()

    @abstractmethod
    def aggregate(self, round_index: int, replies: Sequence[ClientReply]) -> np.ndarray:
        """Soft labels ``float [N, C]``: finite, non-negative, rows summing to one (probabilities, not
        logits). The algorithm checks this and fails the run naming the aggregator otherwise. Raise
        ``ClientFailure(client_id, reason)`` for a reply you refuse (see :meth:`check_replies`)."""

    @staticmethod
    def check_replies(replies: Sequence[ClientReply]) -> tuple[int, int]:
        """The common shape ``(N, C)`` of the replies' logits; ``ClientFailure`` for a reply that is
        misshaped or not finite, ``ValueError`` for no replies."""
        if not replies:
            raise ValueError("cannot aggregate zero replies")
        shape = replies[0].logits.shape
        if len(shape) != 2:
            raise ClientFailure(replies[0].client_id, f"logits of shape {shape}, expected [samples, classes]")
        for reply in replies:
            if reply.logits.shape != shape:
                raise ClientFailure(reply.client_id, f"logits of shape {reply.logits.shape}, expected {shape}")
            if not np.isfinite(reply.logits).all():
                raise ClientFailure(reply.client_id, "logits contain NaN or infinite values")
        return int(shape[0]), int(shape[1])


@dataclass
class AlignmentBatch:
    """Synthetic pairs with the clients' verdict, for fine-tuning the generator.

    ``soft_labels`` are the federation's aggregated soft labels on ``images``; ``class_prompts``
    holds one prompt per class (losses that re-caption an image use it).
    """

    images: np.ndarray
    prompts: list[str]
    class_ids: np.ndarray
    soft_labels: np.ndarray
    class_prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def alignment(self) -> np.ndarray:
        """a_j = q[j, c_j]: how strongly the clients agree image j shows its prompt's class."""
        return self.soft_labels[np.arange(len(self.class_ids)), self.class_ids]

    def subset(self, indices: np.ndarray) -> AlignmentBatch:
        """The pairs at ``indices``, in that order (a mini-batch; ``class_prompts`` kept whole)."""
        idx = np.asarray(indices, dtype=np.int64)
        return AlignmentBatch(
            self.images[idx],
            [self.prompts[i] for i in idx],
            self.class_ids[idx],
            self.soft_labels[idx],
            self.class_prompts,
        )


class DenoisingStep:
    """One fine-tuning step of a diffusion generator on a mini-batch, as alignment losses see it.

    The generator caches it: :meth:`Generator.denoise` called again with the same mini-batch object
    and seed returns the same step, so several losses share one UNet pass (and one VAE decode).

    Tensors are in the generator's framework and carry gradient into its adapter.
    ``per_sample_loss [B]``: the diffusion (denoising) loss of each pair.
    ``signal_weight [B]``: ᾱ_t of each pair's timestep, near 1 where x̂₀ is sharp, near 0 where it is noise.
    ``predicted_images [B, C, H, W]``: the x̂₀ prediction decoded to pixels in [-1, 1] at the task's size,
    computed on first use (decoding costs a VAE pass).
    ``decode_at(resolution)`` (optional): the same at the task's size, but decoded from x̂₀ resized to
    ``resolution`` pixels first (cheaper for a large model); see :meth:`images_at`.
    """

    def __init__(
        self,
        per_sample_loss: Any,
        signal_weight: Any,
        decode: Callable[[], Any],
        decode_at: Callable[[int], Any] | None = None,
    ):
        self.per_sample_loss = per_sample_loss
        self.signal_weight = signal_weight
        self._decode = decode
        self._decode_at = decode_at
        self._at: dict[int, Any] = {}

    @cached_property
    def predicted_images(self) -> Any:
        """x̂₀ decoded to pixels ``[B, C, H, W]`` in [-1, 1], computed on first use."""
        return self._decode()

    def images_at(self, resolution: int | None) -> Any:
        """:attr:`predicted_images` decoded at ``resolution`` (None, or a generator without
        ``decode_at``: the full resolution), cached per resolution."""
        if resolution is None or self._decode_at is None:
            return self.predicted_images
        if resolution not in self._at:
            self._at[resolution] = self._decode_at(resolution)
        return self._at[resolution]


class Generator(Component):
    """The server's text-to-image model (frozen base + trainable adapter).

    Prompts are the task's captions: the algorithm asks for class ``c`` with ``task.prompt(c)``.
    Optional capabilities (see :meth:`capabilities`): ``generate_base`` (images with the adapter off;
    FedMMKT's ``base_fraction``) and ``denoise`` (a :class:`DenoisingStep`; every built-in alignment
    loss). ``fedmmkt validate`` refuses a recipe whose algorithm or losses need one the generator lacks.
    """

    kind = "generator"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("generate_base", "denoise")

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """The optional methods this generator implements: those of :attr:`OPTIONAL` it overrides."""
        return frozenset(name for name in cls.OPTIONAL if getattr(cls, name) is not getattr(Generator, name))

    @abstractmethod
    def build(
        self,
        task: TaskSpec,
        seed: int,
        cache_dir: Path,
        public: ImageSet | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Load or create the base model (pre-training it on ``public`` if configured) and the adapter."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """uint8 images ``[N, H, W, C]`` at the task's size, one per prompt, each reproducible from its seed."""

    def generate_base(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Like :meth:`generate`, with the adapter switched off (the frozen base model)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate without its adapter")

    @abstractmethod
    def fine_tune(
        self, batch: AlignmentBatch, losses: Sequence[tuple[AlignmentLoss, float]], seed: int
    ) -> dict[str, float]:
        """Update the adapter with the weighted sum of ``losses`` on ``batch``; return finite metrics.

        The contract every generator keeps with the losses: skip losses of weight 0; call each
        remaining loss's ``prepare(batch, task, seed)`` once; the pool is the union of the losses'
        ``active(batch)`` masks; draw mini-batches (``batch.subset``) from the pool only, so a loss may
        receive samples another loss marked active and ignores those itself (``compute`` returns
        ``None`` when none of the mini-batch concerns it); minimise ``Σ weight · compute(self, mini,
        step_seed)``. Report each loss's mean value as ``loss_<registered name>``
        (``loss.registered_name``).
        """

    def denoise(self, batch: AlignmentBatch, seed: int) -> DenoisingStep:
        """A :class:`DenoisingStep` on the mini-batch ``batch`` (diffusion generators; used by alignment
        losses). Cache it by ``(batch object, seed)`` so losses sharing a mini-batch share the step."""
        raise NotImplementedError(f"{type(self).__name__} does not expose denoising steps")

    @abstractmethod
    def save_adapter(self, path: Path) -> None:
        """Write only the trainable adapter weights (safetensors)."""

    @abstractmethod
    def load_adapter(self, path: Path) -> None:
        """Restore adapter weights written by :meth:`save_adapter`."""


class AlignmentLoss(Component):
    """A loss that pulls the generator towards what the clients recognise.

    The generator calls :meth:`prepare` once per fine-tuning call with the whole batch, draws
    mini-batches from the union of the samples the losses mark :meth:`active`, and sums
    ``weight * compute(...)``. A mini-batch may therefore hold samples another loss asked for:
    ``compute`` must only learn from its own (mask them with ``active``) and return ``None`` when
    there are none. Declare the generator capabilities ``compute`` calls in :attr:`requires`.
    """

    kind = "alignment_loss"
    #: generator capabilities (:meth:`Generator.capabilities`) ``compute`` uses, e.g. ``{"denoise"}``
    requires: ClassVar[frozenset[str]] = frozenset()

    def generator_requirements(self) -> dict[str, str]:
        return {capability: "" for capability in sorted(self.requires)}

    def prepare(self, batch: AlignmentBatch, task: TaskSpec, seed: int) -> None:
        """Called once with the whole batch before the mini-batch steps (e.g. to fit a helper model)."""

    def active(self, batch: AlignmentBatch) -> np.ndarray:
        """Boolean mask of the samples this loss learns from. Samples no loss marks are never drawn;
        samples only other losses mark may still reach :meth:`compute` in a shared mini-batch."""
        return np.ones(len(batch), dtype=bool)

    @abstractmethod
    def compute(self, generator: Generator, batch: AlignmentBatch, seed: int) -> Any:
        """A scalar loss on the mini-batch ``batch`` (a framework tensor with gradient), or ``None``
        when nothing in it concerns this loss."""


class Algorithm(Component):
    """A round-loop variant (fedmmkt, feddf, fedavg, local...)."""

    kind = "algorithm"
    needs_generator: ClassVar[bool] = False
    #: clients upload logits on shared images (what the recipe's ``privacy`` section protects)
    uploads_soft_labels: ClassVar[bool] = False

    def setup(self, ctx: ServerContext) -> None:
        """Called once before the first round (and again on resume, before ``load_state``)."""

    @abstractmethod
    def run_round(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        """Run one round; return the round's metrics (the context adds bytes and timings)."""

    def evaluate(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        """Metrics after the round; by default every client's accuracy on the test split."""
        return ctx.evaluate_clients()

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything needed to resume: (JSON-able values, arrays)."""
        return {}, {}

    def load_state(self, values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""


class Backend(Component):
    """Delivers messages to clients and brings their replies back (in-process, Flower...)."""

    kind = "backend"

    @abstractmethod
    def start(self, ctx: ServerContext) -> None:
        """Bring up the clients described by ``ctx.clients``."""

    @abstractmethod
    def exchange(
        self,
        messages: Mapping[int, Message],
        round_index: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict[int, Message | BaseException]:
        """Send one message per client id; return each client's reply or the error it raised.

        Call ``progress(1)`` as each client finishes, for progress bars."""

    def launch(self, runner: Runner) -> dict[str, Any] | None:
        """Run the whole run where this backend's server lives and return its summary.

        For backends that must own the server process (Flower deployment starts the round loop
        inside its ServerApp). The default, ``None``, runs the round loop in this process."""
        return None

    def commit_round(self, round_index: int) -> None:
        """The round finished: make client state written during it the state to resume from."""

    def stop(self) -> None:
        """Release every process and resource ``start`` created."""


class Logger(Component):
    """Receives metrics as the run goes (console, CSV, experiment trackers...)."""

    kind = "logger"

    def start(self, run_dir: Path, resolved_recipe: dict[str, Any]) -> None:
        """Called once when the run starts or resumes."""

    @abstractmethod
    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        """Called after every completed round."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called once with the final summary."""


KINDS: dict[str, type[Component]] = {
    cls.kind: cls
    for cls in (Generator, ClientModel, Aggregator, AlignmentLoss, Dataset, Partitioner, Algorithm, Backend, Logger)
}
