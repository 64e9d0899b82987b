"""Every built-in and the example external plugin through the conformance suites."""

from fedmmkt_core.testing import (
    AggregatorTests,
    AlgorithmTests,
    BackendTests,
    ClientModelTests,
    DatasetTests,
    LoggerTests,
    PartitionerTests,
)


class TestCNN(ClientModelTests):
    name = "cnn"
    params = {"channels": [8, 16], "hidden": 32, "lr": 0.003}


class TestResNet(ClientModelTests):
    name = "resnet"
    params = {"lr": 0.003}


class TestViT(ClientModelTests):
    name = "vit"
    params = {"lr": 0.003, "epochs": 4}  # a ViT needs more passes over 200 images than a CNN


class TestSoftmaxRegressionExample(ClientModelTests):
    name = "softmax-regression"
    params = {"epochs": 2}


class TestKDUniform(AggregatorTests):
    name = "kd"


class TestKDClassAware(AggregatorTests):
    name = "kd"
    params = {"weighting": "class_aware", "temperature": 2.0}


class TestKDMedian(AggregatorTests):
    name = "kd"
    params = {"robust": "median"}


class TestMajorityVoteExample(AggregatorTests):
    name = "majority-vote"


class TestIID(PartitionerTests):
    name = "iid"


class TestDirichlet(PartitionerTests):
    name = "dirichlet"
    params = {"alpha": 0.3, "min_samples_per_client": 1}


class TestShards(PartitionerTests):
    name = "shards"


class TestDigits(DatasetTests):
    name = "digits"


class TestConsole(LoggerTests):
    name = "console"


class TestCSV(LoggerTests):
    name = "csv"


class TestLocal(AlgorithmTests):
    name = "local"


class TestFedAvg(AlgorithmTests):
    name = "fedavg"


class TestInProcess(BackendTests):
    name = "inprocess"


class TestInProcessResident(BackendTests):
    name = "inprocess"
    params = {"resident_clients": 2}
