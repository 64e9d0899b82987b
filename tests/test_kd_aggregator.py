"""The KD aggregator's numbers, computed by hand."""

import numpy as np
import pytest
from fedmmkt_plugins.aggregators.kd import KDAggregator, KDConfig

from fedmmkt_core.interfaces import ClientReply

LN3 = np.log(3.0)
# Two clients, one sample, two classes. Client 0: p = (0.75, 0.25); client 1: p = (0.25, 0.75).
A = ClientReply(0, np.array([[LN3, 0.0]], dtype=np.float32), num_samples=30, class_counts=np.array([30, 0]))
B = ClientReply(1, np.array([[0.0, LN3]], dtype=np.float32), num_samples=10, class_counts=np.array([5, 5]))


def agg(**params):
    return KDAggregator(KDConfig(**params))


def test_uniform_mean():
    np.testing.assert_allclose(agg().aggregate(0, [A, B]), [[0.5, 0.5]], atol=1e-6)


def test_sample_count_weights():
    # (30 * 0.75 + 10 * 0.25) / 40 = 0.625
    np.testing.assert_allclose(agg(weighting="samples").aggregate(0, [A, B]), [[0.625, 0.375]], atol=1e-6)


def test_temperature():
    # T = 2: softmax(ln3/2, 0) = sqrt(3) / (sqrt(3) + 1) = 0.6340
    p = np.sqrt(3) / (np.sqrt(3) + 1)
    np.testing.assert_allclose(agg(temperature=2.0).aggregate(0, [A]), [[p, 1 - p]], atol=1e-6)


def test_confidence_weights_equal_for_mirror_clients():
    # both clients are 0.75-confident: weights equal, so the mean
    np.testing.assert_allclose(agg(weighting="confidence").aggregate(0, [A, B]), [[0.5, 0.5]], atol=1e-6)


def test_confidence_weights_favour_the_sure_client():
    sure = ClientReply(2, np.array([[np.log(9.0), 0.0]], dtype=np.float32), 1)  # p = (0.9, 0.1)
    # weights 0.9 and 0.75: q0 = (0.9*0.9 + 0.75*0.25) / 1.65 = 0.6045...
    expected = (0.9 * 0.9 + 0.75 * 0.25) / 1.65
    np.testing.assert_allclose(agg(weighting="confidence").aggregate(0, [sure, B])[0, 0], expected, atol=1e-6)


def test_class_aware_client_without_class_does_not_vote():
    # class 0: counts 30 and 5 -> (30*.75 + 5*.25)/35 = 0.678571; class 1: only B votes -> 0.75
    # rows renormalised: (0.678571, 0.75) / 1.428571
    q = agg(weighting="class_aware").aggregate(0, [A, B])
    c0, c1 = (30 * 0.75 + 5 * 0.25) / 35, 0.75
    np.testing.assert_allclose(q, [[c0 / (c0 + c1), c1 / (c0 + c1)]], atol=1e-6)


def test_median_ignores_one_outlier():
    honest = [ClientReply(k, np.array([[LN3, 0.0]], dtype=np.float32), 10) for k in range(4)]
    attacker = ClientReply(9, np.array([[0.0, 100.0]], dtype=np.float32), 10)
    np.testing.assert_allclose(agg(robust="median").aggregate(0, [*honest, attacker]), [[0.75, 0.25]], atol=1e-6)
    assert agg().aggregate(0, [*honest, attacker])[0, 0] == pytest.approx(0.6, abs=1e-6)  # mean: 4*0.75/5


def test_trimmed_mean_drops_extremes():
    values = [0.1, 0.5, 0.6, 0.7, 0.99]  # p of class 0 per client
    replies = [
        ClientReply(k, np.log(np.array([[v, 1 - v]], dtype=np.float64)).astype(np.float32), 1)
        for k, v in enumerate(values)
    ]
    q = agg(robust="trimmed_mean", trim_fraction=0.2).aggregate(0, replies)
    # drop 0.1 and 0.99 for class 0 (and the mirror for class 1): mean 0.6 / 0.4
    np.testing.assert_allclose(q, [[0.6, 0.4]], atol=1e-5)


def test_class_aware_median_votes_among_holders_and_ignores_inflated_counts():
    # Three honest clients: p(class 0) = 0.75. Client 2 holds no class-1 data; client 3 lies with
    # confident wrong labels and claims 10^6 examples of every class.
    honest = [ClientReply(k, np.array([[LN3, 0.0]], dtype=np.float32), 10, np.array([5, 5])) for k in range(2)]
    without_class_1 = ClientReply(2, np.array([[0.0, 5.0]], dtype=np.float32), 10, np.array([10, 0]))
    liar = ClientReply(3, np.array([[0.0, 20.0]], dtype=np.float32), 10, np.array([10**6, 10**6]))
    replies = [*honest, without_class_1, liar]
    mean = agg(weighting="class_aware").aggregate(0, replies)
    assert mean[0, 1] > 0.99  # the inflated counts win the weighted mean outright
    q = agg(weighting="class_aware", robust="median").aggregate(0, replies)
    # class 0: everyone votes, median of (0.75, 0.75, p2, ~0); class 1: only holders 0, 1 and 3 vote
    p2 = 1 / (1 + np.exp(5.0))
    c0 = np.median([0.75, 0.75, p2, 1 / (1 + np.exp(20.0))])
    c1 = np.median([0.25, 0.25, 1 - 1 / (1 + np.exp(20.0))])
    np.testing.assert_allclose(q, [[c0 / (c0 + c1), c1 / (c0 + c1)]], atol=1e-6)
    assert q[0, 0] > 0.5  # the honest class still wins


def test_screen_drops_the_client_that_disagrees_and_caps_inflated_counts():
    # Three samples, three classes. Honest clients agree on the top class of every sample; the liar names
    # the next class and claims 10^6 examples of each class.
    honest_logits = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    honest = [ClientReply(k, honest_logits.astype(np.float32), 10, np.array([4, 3, 3])) for k in range(3)]
    liar_logits = np.roll(honest_logits, 1, axis=1).astype(np.float32)
    liar = ClientReply(3, liar_logits, 10, np.array([10**6] * 3))
    aggregator = agg(weighting="class_aware", robust="screen")
    q = aggregator.aggregate(0, [*honest, liar])
    assert aggregator.excluded == [3]
    np.testing.assert_allclose(q, np.exp(honest_logits), atol=1e-6)
    # a loud but honest client is kept, its claim capped at 3x the median claim (9 instead of 1000)
    loud = ClientReply(3, honest_logits.astype(np.float32), 10, np.array([1000, 3, 3]))
    different = ClientReply(4, np.log(np.full((3, 3), 1 / 3)).astype(np.float32), 10, np.array([3, 3, 3]))
    q = aggregator.aggregate(0, [*honest, loud, different])
    assert aggregator.excluded == [4]  # uniform predictions agree with nothing
    np.testing.assert_allclose(q, np.exp(honest_logits), atol=1e-6)
    weights = aggregator._weights([*honest, loud], np.zeros((4, 3, 3)), cap_counts=True)
    assert weights[:, 0, 0].tolist() == [4, 4, 4, 12]
