"""fedmmkt's built-in plugins, registered through the same hooks a third-party package uses.

Installed as ``fedmmkt_plugins``. Importing this module must stay cheap: every implementation module
imports its heavy libraries lazily.
"""

from fedmmkt_core.hookspecs import hookimpl

from .aggregator_kd import KDAggregator
from .algorithm_fedavg import FedAvg
from .algorithm_local import LocalOnly
from .backend_inprocess import InProcessBackend
from .client_cnn import CNNClient
from .client_resnet import ResNetClient
from .client_vit import ViTClient
from .dataset_digits import DigitsDataset
from .dataset_hf import HFDiskDataset
from .dataset_imagefolder import ImageFolderDataset
from .logger_console import ConsoleLogger
from .logger_csv import CSVLogger
from .partitioner_dirichlet import DirichletPartitioner
from .partitioner_iid import IIDPartitioner
from .partitioner_shards import ShardsPartitioner


@hookimpl
def register_datasets(register):
    register("digits", DigitsDataset)
    register("imagefolder", ImageFolderDataset)
    register("hf-disk", HFDiskDataset)


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


@hookimpl
def register_backends(register):
    register("inprocess", InProcessBackend)


@hookimpl
def register_loggers(register):
    register("console", ConsoleLogger)
    register("csv", CSVLogger)
