"""The example package's own tests: fedmmkt's conformance suites, inherited (run with pytest)."""

from fedmmkt_core.testing import AggregatorTests, ClientModelTests, GeneratorTests


class TestSoftmaxRegression(ClientModelTests):
    name = "softmax-regression"
    params = {"epochs": 2}


class TestMajorityVote(AggregatorTests):
    name = "majority-vote"


class TestClassPrototypes(GeneratorTests):
    name = "class-prototypes"
    params = {"steps": 5}
