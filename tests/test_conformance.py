"""Every built-in and the example external plugin through the conformance suites."""

from fedmmkt_core.testing import (
    AggregatorTests,
    AlgorithmTests,
    AlignmentLossTests,
    BackendTests,
    ClientModelTests,
    DatasetTests,
    GeneratorTests,
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


class TestKDUniform(AggregatorTests):
    name = "kd"


class TestKDClassAware(AggregatorTests):
    name = "kd"
    params = {"weighting": "class_aware", "temperature": 2.0}


class TestKDMedian(AggregatorTests):
    name = "kd"
    params = {"robust": "median"}


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


TINY_SD = {
    "pretrain": {"vae_steps": 20, "steps": 30},
    "fine_tune_steps": 3,
    "batch_size": 16,
    "num_inference_steps": 4,
}
FEDMMKT_RECIPE = {
    "data.dataset.params": {"public_fraction": 0.2, "public_style": "inverted"},
    "generator": {"name": "sd-lora", "params": TINY_SD},
    "alignment_losses": [{"name": "weighted-denoising", "params": {"threshold": 0.3}}],
}
FEDMMKT_PARAMS = {"samples_per_class": 4, "eval_samples_per_class": 4}


class TestSDLora(GeneratorTests):
    name = "sd-lora"
    params = TINY_SD


class TestWeightedDenoising(AlignmentLossTests):
    name = "weighted-denoising"
    params = {"threshold": 0.5}


class TestEnsembleCE(AlignmentLossTests):
    name = "ensemble-ce"
    params = {"student_epochs": 2}


class TestRelabelDenoising(AlignmentLossTests):
    name = "relabel-denoising"
    params = {"confidence": 0.6}
    soft_labels = "disagree"


class TestFedMMKT(AlgorithmTests):
    name = "fedmmkt"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestFedMMKTFrozen(AlgorithmTests):
    name = "fedmmkt-frozen-generator"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestFedMMKTNoFeedback(AlgorithmTests):
    name = "fedmmkt-no-feedback"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestCentralized(AlgorithmTests):
    name = "centralized"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestFedDF(AlgorithmTests):
    name = "feddf"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestFedMMKTCeilingGenerator(AlgorithmTests):
    name = "fedmmkt-ceiling-generator"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE


class TestFedDFSharpened(AlgorithmTests):
    name = "feddf-sharpened"
    params = FEDMMKT_PARAMS
    recipe = FEDMMKT_RECIPE
