"""Example third-party plugin: registers a client model, an aggregator and a generator through fedmmkt's hooks."""

from fedmmkt_core.hookspecs import hookimpl

from .class_prototypes import ClassPrototypesGenerator
from .majority_vote import MajorityVoteAggregator
from .softmax_regression import SoftmaxRegressionClient


@hookimpl
def register_client_models(register):
    register("softmax-regression", SoftmaxRegressionClient)


@hookimpl
def register_aggregators(register):
    register("majority-vote", MajorityVoteAggregator)


@hookimpl
def register_generators(register):
    register("class-prototypes", ClassPrototypesGenerator)
