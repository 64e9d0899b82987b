"""fedmmkt's built-in plugins, registered through the same hooks a third-party package uses.

Installed as ``fedmmkt_plugins``. Importing this module must stay cheap: every implementation module
imports its heavy libraries lazily.

One sub-package per kind (``algorithms``, ``aggregators``, ``backends``, ``clients``, ``datasets``,
``generators``, ``loggers``, ``losses``, ``partitioners``) and ``evaluation`` (the oracle and sample
grids the algorithms use). The flat module names of earlier releases (``fedmmkt_plugins.client_vit``...)
still import, with a ``DeprecationWarning``.
"""

from fedmmkt_plugins.aggregators.kd import KDAggregator
from fedmmkt_plugins.algorithms.centralized import Centralized
from fedmmkt_plugins.algorithms.fedavg import FedAvg
from fedmmkt_plugins.algorithms.feddf import FedDF
from fedmmkt_plugins.algorithms.feddf_sharpened import FedDFSharpened
from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT
from fedmmkt_plugins.algorithms.fedmmkt_ceiling_generator import FedMMKTCeilingGenerator
from fedmmkt_plugins.algorithms.fedmmkt_frozen import FedMMKTFrozenGenerator
from fedmmkt_plugins.algorithms.fedmmkt_no_feedback import FedMMKTNoFeedback
from fedmmkt_plugins.algorithms.local import LocalOnly
from fedmmkt_plugins.backends.flower import FlowerBackend
from fedmmkt_plugins.backends.inprocess import InProcessBackend
from fedmmkt_plugins.clients.cnn import CNNClient
from fedmmkt_plugins.clients.resnet import ResNetClient
from fedmmkt_plugins.clients.vit import ViTClient
from fedmmkt_plugins.datasets.digits import DigitsDataset
from fedmmkt_plugins.datasets.hf_disk import HFDiskDataset
from fedmmkt_plugins.datasets.idx import IDXDataset
from fedmmkt_plugins.datasets.imagefolder import ImageFolderDataset
from fedmmkt_plugins.datasets.typeset_digits import TypesetDigitsDataset
from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator
from fedmmkt_plugins.loggers.console import ConsoleLogger
from fedmmkt_plugins.loggers.csv import CSVLogger
from fedmmkt_plugins.loggers.mlflow import MLflowLogger
from fedmmkt_plugins.loggers.tensorboard import TensorBoardLogger
from fedmmkt_plugins.losses.ensemble_ce import EnsembleCELoss
from fedmmkt_plugins.losses.relabel_denoising import RelabelDenoisingLoss
from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss
from fedmmkt_plugins.partitioners.dirichlet import DirichletPartitioner
from fedmmkt_plugins.partitioners.iid import IIDPartitioner
from fedmmkt_plugins.partitioners.shards import ShardsPartitioner

from fedmmkt_core.aliases import keep_old_paths
from fedmmkt_core.hookspecs import hookimpl

# earlier releases' flat module names -> where each module lives now
_MOVED = {
    "aggregator_kd": "aggregators.kd",
    "algorithm_centralized": "algorithms.centralized",
    "algorithm_fedavg": "algorithms.fedavg",
    "algorithm_feddf": "algorithms.feddf",
    "algorithm_feddf_sharpened": "algorithms.feddf_sharpened",
    "algorithm_fedmmkt": "algorithms.fedmmkt",
    "algorithm_fedmmkt_ceiling_generator": "algorithms.fedmmkt_ceiling_generator",
    "algorithm_fedmmkt_frozen": "algorithms.fedmmkt_frozen",
    "algorithm_fedmmkt_no_feedback": "algorithms.fedmmkt_no_feedback",
    "algorithm_local": "algorithms.local",
    "backend_inprocess": "backends.inprocess",
    "client_cnn": "clients.cnn",
    "client_resnet": "clients.resnet",
    "client_vit": "clients.vit",
    "dataset_digits": "datasets.digits",
    "dataset_hf": "datasets.hf_disk",
    "dataset_idx": "datasets.idx",
    "dataset_imagefolder": "datasets.imagefolder",
    "dataset_typeset_digits": "datasets.typeset_digits",
    "fetch": "datasets.fetch",
    "flower": "backends.flower",
    "flower.backend": "backends.flower.backend",
    "flower.client_app": "backends.flower.client_app",
    "flower.codec": "backends.flower.codec",
    "flower.federation": "backends.flower.federation",
    "flower.packaging": "backends.flower.packaging",
    "flower.processes": "backends.flower.processes",
    "flower.server_app": "backends.flower.server_app",
    "flower_app": "backends.flower.app",
    "generator_sd_lora": "generators.sd_lora",
    "logger_console": "loggers.console",
    "logger_csv": "loggers.csv",
    "logger_mlflow": "loggers.mlflow",
    "logger_tensorboard": "loggers.tensorboard",
    "loss_ensemble_ce": "losses.ensemble_ce",
    "loss_relabel_denoising": "losses.relabel_denoising",
    "loss_weighted_denoising": "losses.weighted_denoising",
    "oracle": "evaluation.oracle",
    "partitioner_dirichlet": "partitioners.dirichlet",
    "partitioner_iid": "partitioners.iid",
    "partitioner_shards": "partitioners.shards",
    "sample_grid": "evaluation.sample_grid",
    "torch_classifier": "clients.torch_classifier",
}
keep_old_paths({f"fedmmkt_plugins.{old}": f"fedmmkt_plugins.{new}" for old, new in _MOVED.items()})


@hookimpl
def register_datasets(register):
    register("digits", DigitsDataset)
    register("imagefolder", ImageFolderDataset)
    register("hf-disk", HFDiskDataset)
    register("typeset-digits", TypesetDigitsDataset)
    register("idx", IDXDataset)


@hookimpl
def register_partitioners(register):
    register("iid", IIDPartitioner)
    register("dirichlet", DirichletPartitioner)
    register("shards", ShardsPartitioner)


@hookimpl
def register_client_models(register):
    register("cnn", CNNClient)
    register("resnet", ResNetClient)
    register("vit", ViTClient)


@hookimpl
def register_aggregators(register):
    register("kd", KDAggregator)


@hookimpl
def register_algorithms(register):
    register("local", LocalOnly)
    register("fedavg", FedAvg)
    register("feddf", FedDF)
    register("feddf-sharpened", FedDFSharpened)
    register("fedmmkt", FedMMKT)
    register("fedmmkt-frozen-generator", FedMMKTFrozenGenerator)
    register("fedmmkt-no-feedback", FedMMKTNoFeedback)
    register("fedmmkt-ceiling-generator", FedMMKTCeilingGenerator)
    register("centralized", Centralized)


@hookimpl
def register_backends(register):
    register("inprocess", InProcessBackend)
    register("flower", FlowerBackend)


@hookimpl
def register_loggers(register):
    register("console", ConsoleLogger)
    register("csv", CSVLogger)
    register("tensorboard", TensorBoardLogger)
    register("mlflow", MLflowLogger)


@hookimpl
def register_generators(register):
    register("sd-lora", SDLoraGenerator)


@hookimpl
def register_alignment_losses(register):
    register("weighted-denoising", WeightedDenoisingLoss)
    register("ensemble-ce", EnsembleCELoss)
    register("relabel-denoising", RelabelDenoisingLoss)
