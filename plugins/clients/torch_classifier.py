"""Shared local training for client models written in PyTorch.

Subclass :class:`TorchClassifier`, implement :meth:`make_network`, and you get the federated local
update (CE on private data + KD towards the federation's soft labels), prediction and weights I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedmmkt_core.data import DistillSet, ImageSet, TaskSpec
from fedmmkt_core.interfaces import ClientModel, ComponentConfig
from fedmmkt_core.lazy import lazy_import

TORCH_HINT = "Install the CPU build with: pip install torch==2.13.0 (see constraints.txt)"
torch = lazy_import("torch", TORCH_HINT)
F = lazy_import("torch.nn.functional", TORCH_HINT)
WHOLE_SET_FLOAT_BYTES = 64 * 2**20  # image sets up to this size as floats are converted to tensors once per fit
INVERSION_CHUNK = 512  # images per forward pass of the inversion feedback (its BatchNorm statistics' batch)


class TorchClassifierConfig(ComponentConfig):
    epochs: int = Field(1, ge=1, description="local epochs over the private data per round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    epoch_steps: Literal["private", "longer"] = Field(
        "private",
        description="steps in a local epoch. private: one pass over the private data, the KD batches cycling "
        "through the synthetic set alongside (a client with little data distils little); longer: one pass over "
        "the longer of the private data and the synthetic set, the shorter cycling",
    )
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")


class TorchClassifier(ClientModel):
    """Base for PyTorch client models: implement :meth:`make_network`."""

    Config = TorchClassifierConfig
    config: TorchClassifierConfig

    def make_network(self, task: TaskSpec) -> Any:
        """Return a ``torch.nn.Module`` mapping float images ``[N, C, H, W]`` in [-1, 1] to logits."""
        raise NotImplementedError

    def build(self, task: TaskSpec, seed: int) -> None:
        self.task = task
        torch.manual_seed(seed)
        self.device = torch.device(self.config.device)
        self.net = self.make_network(task).to(self.device)

    def _tensor(self, images: np.ndarray) -> Any:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def _batches(self, images: np.ndarray) -> Any:
        """``take(indices)`` -> a float batch. Sets up to 64 MiB as floats are converted once, not per
        batch: for the demo's small models the per-batch conversion cost a third of the local update
        (benchmarks.cost's client-fit check). Larger sets are converted batch by batch."""
        if images.size * 4 <= WHOLE_SET_FLOAT_BYTES:
            # kept [N, H, W, C] and permuted per batch: the same memory layout as _tensor gives, so both
            # paths run the same kernels and train to identical weights
            whole = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).float().div(127.5).sub(1.0)
            return lambda idx: whole[idx].permute(0, 3, 1, 2)
        return lambda idx: self._tensor(images[idx.numpy()])

    def _optimizer(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay)
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def fit(self, train: ImageSet, distill: DistillSet | None, seed: int) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = self._optimizer()
        self.net.train()
        labels = torch.from_numpy(train.labels).to(self.device)
        take_train = self._batches(train.images)
        take_distill = self._batches(distill.images) if distill is not None else None
        soft_labels = torch.from_numpy(distill.soft_labels).to(self.device) if distill is not None else None
        n = len(train)
        steps_per_epoch = max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
        longer = cfg.epoch_steps == "longer"
        if longer and distill is not None and distill.weight > 0:
            steps_per_epoch = max(steps_per_epoch, (len(distill.images) + cfg.batch_size - 1) // cfg.batch_size)
        total_loss, total_kd, steps = 0.0, 0.0, 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            distill_order = torch.randperm(len(distill.images), generator=generator) if distill is not None else None
            for step in range(steps_per_epoch):
                idx = _cycled_batch(order, step, cfg.batch_size, steps_per_epoch)  # a plain slice unless longer
                logits = self.net(take_train(idx))
                loss = F.cross_entropy(logits, labels[idx])
                kd_value = 0.0
                if distill is not None and distill.weight > 0:
                    if longer:
                        didx = _cycled_batch(distill_order, step, cfg.batch_size, steps_per_epoch)
                    else:
                        start = (step * cfg.batch_size) % len(distill.images)
                        didx = distill_order[start : start + cfg.batch_size]
                    student = self.net(take_distill(didx))
                    target = soft_labels[didx]
                    t = distill.temperature
                    kd = F.kl_div(F.log_softmax(student / t, dim=1), target, reduction="batchmean") * t * t
                    loss = loss + distill.weight * kd
                    kd_value = float(kd.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                total_kd += kd_value
                steps += 1
        return {"loss": total_loss / steps, "kd_loss": total_kd / steps}

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        self.net.eval()
        outputs = []
        with torch.no_grad():
            for start in range(0, len(images), 256):
                outputs.append(self.net(self._tensor(images[start : start + 256])).float().cpu().numpy())
        if not outputs:
            return np.zeros((0, self.task.num_classes), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)

    def inversion_deltas(
        self, images: np.ndarray, class_ids: np.ndarray, steps: int, step_size: float, seed: int
    ) -> np.ndarray:
        """Normalised gradient steps on the images (the model frozen, in eval mode), descending the
        cross-entropy of each image's class plus, where the network has BatchNorm layers, DeepInversion's
        feature-statistics loss: how far the batch's per-channel mean and variance at each BatchNorm input
        lie from the running statistics of this client's private data. Each term's gradient is scaled to
        unit root-mean-square per image before they are added, and each step moves an image by
        ``step_size / steps`` root-mean-square. BatchNorm statistics are taken over chunks of up to
        ``INVERSION_CHUNK`` images in a seeded random order, so a chunk mixes classes."""
        self.net.eval()
        start = self._tensor(images)
        x = start.clone()
        targets = torch.from_numpy(np.asarray(class_ids, dtype=np.int64)).to(self.device)
        norms = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        norms = [m for m in norms if m.running_mean is not None and m.running_var is not None]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(self.device)
        for _ in range(steps):
            direction = torch.zeros_like(x)
            for chunk in order.split(INVERSION_CHUNK):
                direction[chunk] = self._inversion_direction(x[chunk], targets[chunk], norms)
            x = (x - (step_size / steps) * _unit_rms(direction)).clamp(-1.0, 1.0)
        return (x - start).permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.float32)

    def _inversion_direction(self, x: Any, targets: Any, norms: list[Any]) -> Any:
        x = x.detach().requires_grad_(True)
        inputs: list[tuple[Any, Any]] = []
        hooks = [m.register_forward_hook(lambda m, args, _out: inputs.append((m, args[0]))) for m in norms]
        try:
            logits = self.net(x)
        finally:
            for hook in hooks:
                hook.remove()
        (ce_gradient,) = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), x, retain_graph=True)
        direction = _unit_rms(ce_gradient)
        if inputs:
            statistics = sum(
                torch.linalg.vector_norm(h.mean(dim=(0, 2, 3)) - m.running_mean)
                + torch.linalg.vector_norm(h.var(dim=(0, 2, 3), unbiased=False) - m.running_var)
                for m, h in inputs
            )
            (bn_gradient,) = torch.autograd.grad(statistics, x)
            direction = direction + _unit_rms(bn_gradient)
        return direction.detach()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        own = self.net.state_dict()
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or extra:
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in weights.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"weight '{key}' has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}")
        self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})


def _cycled_batch(order: Any, step: int, batch_size: int, steps_per_epoch: int) -> Any:
    """Step ``step``'s indices from a set in ``order``: consecutive slices while one pass covers the epoch;
    when the epoch is longer than the set, full batches of ``min(batch_size, len(order))`` wrapping around it
    (a wrapped slice could hold a single image, on which BatchNorm cannot train)."""
    n = len(order)
    if n == 0 or steps_per_epoch <= -(-n // batch_size):
        return order[step * batch_size : (step + 1) * batch_size]
    size = min(batch_size, n)
    return order[(step * size + torch.arange(size)) % n]


def _unit_rms(gradient: Any) -> Any:
    """Each image's gradient ``[N, C, H, W]`` scaled to unit root-mean-square (zero stays zero)."""
    rms = gradient.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return gradient / rms.clamp_min(1e-12)


def hf_classifier_module(
    model: Any, task: TaskSpec, model_channels: int | None = None, model_size: int | None = None
) -> Any:
    """Wrap a transformers image classifier as :meth:`TorchClassifier.make_network`'s network.

    ``model`` is any ``transformers`` model that takes ``pixel_values`` ``[N, C, H, W]`` and returns an
    output with ``.logits`` ``[N, num_classes]`` (``ResNetForImageClassification``,
    ``ViTForImageClassification``, ``ConvNextV2ForImageClassification``...), built with
    ``num_labels=task.num_classes``. The returned ``torch.nn.Module`` maps the client's float images
    ``[N, C, H, W]`` in [-1, 1] to those logits; its ``state_dict`` (what the client saves and restores)
    is the model's under the prefix ``model.``.

    ``model_channels`` and ``model_size`` are the geometry the model expects (default: the task's,
    ``task.channels`` and ``task.image_size``, right for a model built from a config for this task).
    Grey images are repeated to ``model_channels`` and images are resized (bilinear) to ``model_size``
    when they differ, so a pre-trained checkpoint keeps its own geometry; other channel mismatches are
    a ``ValueError``. :func:`pretrained_hf_classifier` loads a local checkpoint and wraps it::

        class ConvNextV2Client(TorchClassifier):
            def make_network(self, task):
                config = transformers.ConvNextV2Config(
                    num_channels=task.channels, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                    patch_size=2, num_labels=task.num_classes,
                )
                return hf_classifier_module(transformers.ConvNextV2ForImageClassification(config), task)
    """
    model_channels = task.channels if model_channels is None else model_channels
    model_size = task.image_size if model_size is None else model_size

    class HFClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            if x.shape[1] != model_channels:
                if x.shape[1] == 1:
                    x = x.repeat(1, model_channels, 1, 1)
                else:
                    raise ValueError(f"images have {x.shape[1]} channels, the model expects {model_channels}")
            if x.shape[-1] != model_size or x.shape[-2] != model_size:
                x = F.interpolate(x, size=(model_size, model_size), mode="bilinear", align_corners=False)
            return self.model(pixel_values=x).logits

    return HFClassifier()


def pretrained_hf_classifier(model_class: Any, path: Any, task: TaskSpec) -> Any:
    """``model_class.from_pretrained(path)`` (a local ``save_pretrained`` folder with ``model.safetensors``:
    safetensors only, never pickle weights) with a new head of ``task.num_classes``, wrapped by
    :func:`hf_classifier_module` at the checkpoint's own geometry (``config.num_channels`` and
    ``config.image_size``, or the task's size when the config has none)."""
    model = model_class.from_pretrained(
        str(path), num_labels=task.num_classes, ignore_mismatched_sizes=True, use_safetensors=True
    )
    size = int(getattr(model.config, "image_size", 0) or task.image_size)
    return hf_classifier_module(model, task, model.config.num_channels, size)
