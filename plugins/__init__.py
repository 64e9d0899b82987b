"""fedmmkt's built-in plugins, registered through the same hooks a third-party package uses.

Installed as ``fedmmkt_plugins``. Importing this module must stay cheap: every implementation module
imports its heavy libraries lazily.
"""

from fedmmkt_core.hookspecs import hookimpl

from .aggregator_kd import KDAggregator
from .algorithm_centralized import Centralized
from .algorithm_fedavg import FedAvg
from .algorithm_feddf import FedDF
from .algorithm_feddf_sharpened import FedDFSharpened
from .algorithm_fedmmkt import FedMMKT
from .algorithm_fedmmkt_ceiling_generator import FedMMKTCeilingGenerator
from .algorithm_fedmmkt_frozen import FedMMKTFrozenGenerator
from .algorithm_fedmmkt_no_feedback import FedMMKTNoFeedback
from .algorithm_local import LocalOnly
from .backend_inprocess import InProcessBackend
from .client_cnn import CNNClient
from .client_resnet import ResNetClient
from .client_vit import ViTClient
from .dataset_digits import DigitsDataset
from .dataset_hf import HFDiskDataset
from .dataset_idx import IDXDataset
from .dataset_imagefolder import ImageFolderDataset
from .dataset_typeset_digits import TypesetDigitsDataset
from .flower import FlowerBackend
from .generator_sd_lora import SDLoraGenerator
from .logger_console import ConsoleLogger
from .logger_csv import CSVLogger
from .logger_mlflow import MLflowLogger
from .logger_tensorboard import TensorBoardLogger
from .loss_ensemble_ce import EnsembleCELoss
from .loss_relabel_denoising import RelabelDenoisingLoss
from .loss_weighted_denoising import WeightedDenoisingLoss
from .partitioner_dirichlet import DirichletPartitioner
from .partitioner_iid import IIDPartitioner
from .partitioner_shards import ShardsPartitioner


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
