"""The client side of every backend: one client's private data and model, answering messages.

A backend (in-process, Flower...) only moves messages; what a client does with them lives here,
so every backend runs the same client code. Message types:

Under differential privacy (``privacy`` in the recipe) a client uploads only what is noised and
counted in ε: the clipped, noised logits. Class counts, its sample count and its training metrics
are withheld. The client charges every upload to its own :class:`~fedmmkt_core.privacy.PrivacyLedger`
before it leaves, reports the ε it computed from its ledger as ``privacy_epsilon`` in every reply, and
refuses (:class:`~fedmmkt_core.privacy.PrivacyRefused`, recorded by the server as this client's
failure) ``return_weights`` and any upload past ``privacy.max_epsilon``.

``fit``       train locally. config: ``seed``, optional ``kd_weight``/``temperature``,
              ``return_weights``, ``logits_dtype``, ``evaluate`` (also reply ``accuracy`` and
              ``num_test`` of the model just trained, as ``evaluate`` would); arrays: optional ``weights/*`` (start from
              these), ``distill_images`` + ``distill_soft_labels``, ``predict_images``.
              Reply: ``num_samples`` and metrics, ``weights/*`` when asked (FedAvg only), and
              ``logits`` + ``class_counts`` on ``predict_images`` after training when given.
``predict``   arrays: ``images`` uint8. Reply: ``logits`` float32, ``class_counts``, ``num_samples``.
``evaluate``  arrays: optional ``weights/*``. Reply: ``accuracy``, ``num_test``.

Inversion feedback (``fit`` and ``predict``, with images to label): config ``inversion_steps`` > 0 and
``inversion_step_size``, array ``image_class_ids`` (the class each image was generated for) ask for
``inversion_deltas`` float16 ``[N, H, W, C]`` (:meth:`ClientModel.inversion_deltas`), computed after
training. Never under DP (they are not noised or counted in ε), nor by a model that cannot compute them.

Class means (``fit`` and ``predict``): config ``class_means_min_count`` k > 0 asks for ``class_means``
float16 ``[C, H, W, ch]`` (the mean private image of each class with at least k images, [-1, 1] scale;
zeros otherwise) and ``class_mean_counts`` int64 ``[C]`` (0 where withheld). Never under DP; a k below
``MIN_CLASS_MEAN_IMAGES`` (10) is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

import numpy as np

from fedmmkt_core.data import DistillSet, ImageSet, TaskSpec
from fedmmkt_core.faults import FaultSpec
from fedmmkt_core.interfaces import ClientModel
from fedmmkt_core.privacy import PrivacyLedger, PrivacyRefused, SoftLabelPrivacy
from fedmmkt_core.rundir import load_safetensors, save_safetensors
from fedmmkt_core.wire import EVALUATE_AFTER_FIT, Message, MessageError, with_prefix

# The client-side secret that makes DP noise reproducible (see ClientRuntime.noise_rng). Read by the
# client alone: from this environment variable in-process, from the node config on Flower.
CLIENT_SECRET_ENV = "FEDMMKT_CLIENT_SECRET"

MAX_SYNTHETIC_IMAGES = 100_000
MAX_INVERSION_STEPS = 100
# A client never uploads the mean of fewer private images than this, whatever a server asks: a mean of a
# handful of images is close to the images themselves.
MIN_CLASS_MEAN_IMAGES = 10
# Logits may travel as float16: half the upload, and soft labels need no more precision.
LOGIT_DTYPES = {"float32": np.float32, "float16": np.float16}


class ClientRuntime:
    """One client: its partition, the held-out test split and its task model."""

    def __init__(
        self,
        client_id: int,
        model: ClientModel,
        train: ImageSet,
        test: ImageSet,
        task: TaskSpec,
        fault: FaultSpec | None = None,
        privacy: SoftLabelPrivacy | None = None,
        secret: str | None = None,
        ledger: PrivacyLedger | None = None,
        class_mean_floor: int | None = None,
    ):
        """``ledger``: where this client's DP uploads are charged (under ``privacy``); backends pass one
        kept with the client's state, the default lives only as long as this object.
        ``class_mean_floor``: the site's least class size for class-mean feedback (never below
        ``MIN_CLASS_MEAN_IMAGES``)."""
        self.client_id = client_id
        self._secret = secret
        self.model = model
        self.train = train
        self.test = test
        self.task = task
        self.fault = fault
        self.privacy = privacy
        self.class_mean_floor = max(MIN_CLASS_MEAN_IMAGES, int(class_mean_floor or 0))
        self.ledger = ledger if ledger is not None or privacy is None else PrivacyLedger()
        self.weights_changed = False
        self.abandoned = threading.Event()  # set by a backend that stopped waiting for this client

    def handle(self, message: Message) -> Message:
        handler = {"fit": self._fit, "predict": self._predict, "evaluate": self._evaluate}.get(message.type)
        if handler is None:
            raise MessageError(f"client {self.client_id} cannot handle message type '{message.type}'")
        if self.privacy is not None and message.type == "fit" and message.config.get("return_weights"):
            raise PrivacyRefused(
                f"client {self.client_id} is under differential privacy and does not send its weights (return_weights)"
            )
        fault = self.fault
        if fault is None or message.type == "evaluate" or not fault.fires(_seed(message), self.client_id):
            return handler(message)
        fault.before_work(self.abandoned)
        reply = handler(message)
        return Message(reply.type, reply.config, fault.tamper(reply.arrays))

    def _images(self, message: Message, name: str) -> np.ndarray:
        size, channels = self.task.image_size, self.task.channels
        images = message.array(name, np.uint8, (None, size, size, channels))
        if len(images) > MAX_SYNTHETIC_IMAGES:
            raise MessageError(f"{len(images)} images exceed the limit of {MAX_SYNTHETIC_IMAGES}")
        return images

    def _maybe_set_weights(self, message: Message) -> None:
        weights = message.weights()
        if weights:
            self.model.set_weights(weights)
            self.weights_changed = True

    def _fit(self, message: Message) -> Message:
        self._maybe_set_weights(message)
        distill = None
        if "distill_images" in message.arrays:
            images = self._images(message, "distill_images")
            soft = message.array("distill_soft_labels", np.float32, (len(images), self.task.num_classes), finite=True)
            distill = DistillSet(
                images=images,
                soft_labels=soft,
                weight=float(message.config.get("kd_weight", 1.0)),
                temperature=float(message.config.get("temperature", 1.0)),
            )
        predict_images = self._images(message, "predict_images") if "predict_images" in message.arrays else None
        dtype = _logits_dtype(message)
        charge = self._charge(message, len(predict_images)) if predict_images is not None else None
        metrics = self.model.fit(self.train, distill, seed=int(message.config["seed"]))
        self.weights_changed = True
        arrays = with_prefix(self.model.get_weights()) if message.config.get("return_weights") else {}
        if predict_images is not None:
            arrays.update(self._logits(predict_images, dtype, charge))
            arrays.update(self._inversion(message, predict_images))
        arrays.update(self._class_means(message))
        config: dict = self._privacy_report(charge)
        if self.privacy is None:  # under DP only noised, accounted values go up
            config = {"num_samples": len(self.train), **{k: float(v) for k, v in metrics.items()}}
        if message.config.get(EVALUATE_AFTER_FIT):  # the evaluation split, as an evaluate reply reports it
            config.update(self._test_accuracy())
        return Message("fit_reply", config, arrays)

    def _charge(self, message: Message, rows: int) -> tuple[int, float] | None:
        """Under DP: charge one upload of ``rows`` logit rows to the ledger before any work is done
        (refused past the budget); returns (the upload's counter, the ε with it)."""
        if self.privacy is None:
            return None
        assert self.ledger is not None
        try:
            return self.ledger.record(self.privacy, type=message.type, rows=int(rows))
        except PrivacyRefused as exc:
            raise PrivacyRefused(f"client {self.client_id} refuses: {exc}") from None

    def _privacy_report(self, charge: tuple[int, float] | None) -> dict[str, float]:
        """Under DP, the ε this client computed from its own ledger (what the run reports) and the noise
        multiplier it ran under (a setting, not data: a stricter site's, so the server can bound its logits)."""
        if self.privacy is None:
            return {}
        assert self.ledger is not None
        epsilon = charge[1] if charge is not None else self.ledger.epsilon(self.privacy.delta)
        return {"privacy_epsilon": epsilon, "privacy_noise_multiplier": float(self.privacy.noise_multiplier)}

    def _logits(self, images: np.ndarray, dtype: str, charge: tuple[int, float] | None) -> dict[str, np.ndarray]:
        logits = np.asarray(self.model.predict_logits(images), dtype=np.float32)
        if self.privacy is not None:  # noised here, on the client: the server never sees clean logits
            assert charge is not None
            logits = self.privacy.privatize(logits, self.noise_rng(charge[0]))
            return {"logits": logits.astype(LOGIT_DTYPES[dtype])}  # exact class counts would escape ε
        counts = self.train.class_counts(self.task.num_classes)
        return {"logits": logits.astype(LOGIT_DTYPES[dtype]), "class_counts": counts}

    def _inversion(self, message: Message, images: np.ndarray) -> dict[str, np.ndarray]:
        """``inversion_deltas`` on ``images`` when the message asks for them; none under DP (they would
        escape ε) or from a model that cannot compute them."""
        steps = message.number("inversion_steps", 0, MAX_INVERSION_STEPS, required=False, integer=True)
        if not steps or self.privacy is not None:
            return {}
        step_size = message.number("inversion_step_size", 0.0, 2.0, required=True)
        if step_size <= 0:
            raise MessageError("inversion_step_size must be positive")
        class_ids = message.array("image_class_ids", np.int64, (len(images),))
        if len(class_ids) and (class_ids.min() < 0 or class_ids.max() >= self.task.num_classes):
            raise MessageError(f"image_class_ids must lie in [0, {self.task.num_classes})")
        try:
            deltas = self.model.inversion_deltas(images, class_ids, int(steps), float(step_size), _seed(message))
        except NotImplementedError:
            return {}
        deltas = np.asarray(deltas, dtype=np.float32)
        if deltas.shape != images.shape or not np.isfinite(deltas).all() or np.abs(deltas).max(initial=0) > 2:
            raise ValueError(f"{type(self.model).__name__}.inversion_deltas broke its contract (shape, range [-2, 2])")
        return {"inversion_deltas": deltas.astype(np.float16)}

    def _class_means(self, message: Message) -> dict[str, np.ndarray]:
        """``class_means`` and ``class_mean_counts`` when the message asks for them; none under DP (they
        would escape ε)."""
        min_count = message.number("class_means_min_count", 0, 1_000_000, required=False, integer=True)
        if not min_count or self.privacy is not None:
            return {}
        if min_count < MIN_CLASS_MEAN_IMAGES:
            raise MessageError(
                f"class_means_min_count must be at least {MIN_CLASS_MEAN_IMAGES}: a client never uploads the mean of "
                "fewer private images"
            )
        means, counts = self.train.class_means(self.task.num_classes, max(int(min_count), self.class_mean_floor))
        return {"class_means": means.astype(np.float16), "class_mean_counts": counts}

    def noise_rng(self, counter: int) -> np.random.Generator:
        """Randomness for DP noise that only this client holds.

        Without a client secret: fresh OS entropy every time (nobody, this client included, can
        regenerate it). With one (``FEDMMKT_CLIENT_SECRET`` or a node's ``client-secret``): derived
        from the secret, the client id and ``counter``, the upload's position in this client's
        ledger, which the client alone advances: no value from the server enters it, so two requests
        never get the same noise within a run, and a fresh run with the same secret repeats its
        experiment exactly. Whoever knows the secret can regenerate the noise, so it is for
        experiments: a site that shares it with the server, or uses one secret for several runs a
        server can compare, has no guarantee; leave it unset in production.
        """
        if self._secret is None:
            return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        digest = hashlib.sha256(f"{self._secret}\x00{self.client_id}\x00dp-noise\x00{int(counter)}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))

    def _predict(self, message: Message) -> Message:
        images = self._images(message, "images")
        dtype = _logits_dtype(message)
        charge = self._charge(message, len(images))
        arrays = {**self._logits(images, dtype, charge), **self._inversion(message, images)}
        arrays.update(self._class_means(message))
        config = {"num_samples": len(self.train)} if self.privacy is None else self._privacy_report(charge)
        return Message("predict_reply", config, arrays)

    def _evaluate(self, message: Message) -> Message:
        self._maybe_set_weights(message)
        return Message("evaluate_reply", {**self._test_accuracy(), **self._privacy_report(None)})

    def _test_accuracy(self) -> dict[str, float | int]:
        logits = self.model.predict_logits(self.test.images)
        accuracy = float((np.argmax(logits, axis=1) == self.test.labels).mean()) if len(self.test) else float("nan")
        return {"accuracy": accuracy, "num_test": len(self.test)}


def _logits_dtype(message: Message) -> str:
    dtype = str(message.config.get("logits_dtype", "float32"))
    if dtype not in LOGIT_DTYPES:
        raise MessageError(f"logits_dtype must be one of {sorted(LOGIT_DTYPES)}, got '{dtype}'")
    return dtype


def _seed(message: Message) -> int:
    seed = message.config.get("seed", 0)
    return seed if isinstance(seed, int) else 0


class ClientStateStore:
    """Client weights on disk, one file per client per round, so a run resumes at a round boundary.

    Weights written during round r are stored as ``client_{k}.r{r}.safetensors``; resuming after
    round r loads, for each client, the newest file of a round <= r and ignores later ones.
    """

    _pattern = re.compile(r"client_(\d+)\.r(\d+)\.safetensors$")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def ledger(self, client_id: int) -> PrivacyLedger:
        """Client ``client_id``'s privacy ledger, next to its weights; never pruned or discarded."""
        return PrivacyLedger(self.root / f"client_{client_id}.privacy.json")

    def save(self, client_id: int, round_index: int, weights: dict[str, np.ndarray]) -> None:
        save_safetensors(self.root / f"client_{client_id}.r{round_index}.safetensors", weights)

    def _rounds(self, client_id: int) -> list[int]:
        rounds = []
        for path in self.root.glob(f"client_{client_id}.r*.safetensors"):
            match = self._pattern.search(path.name)
            if match and int(match.group(1)) == client_id:
                rounds.append(int(match.group(2)))
        return sorted(rounds)

    def load(self, client_id: int, up_to_round: int) -> dict[str, np.ndarray] | None:
        usable = [r for r in self._rounds(client_id) if r <= up_to_round]
        if not usable:
            return None
        return load_safetensors(self.root / f"client_{client_id}.r{usable[-1]}.safetensors")

    def discard_from(self, round_index: int) -> None:
        """Delete files written in round ``round_index`` or later (left by an interrupted round)."""
        for path in self.root.glob("client_*.r*.safetensors"):
            match = self._pattern.search(path.name)
            if match and int(match.group(2)) >= round_index:
                path.unlink(missing_ok=True)

    def prune(self, client_id: int, keep_round: int) -> None:
        """Delete files older than the newest one of a round <= ``keep_round``."""
        rounds = self._rounds(client_id)
        usable = [r for r in rounds if r <= keep_round]
        for r in usable[:-1]:
            (self.root / f"client_{client_id}.r{r}.safetensors").unlink(missing_ok=True)
