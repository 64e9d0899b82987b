"""Server knowledge to the clients, the step-matched control, the upper bounds and the server's own public data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT
from fedmmkt_plugins.datasets.typeset_digits import TypesetDigitsDataset
from test_fedmmkt import RECIPE

from fedmmkt_core.errors import RecipeError
from fedmmkt_core.loading import load_server_data
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.wire import Message


def _algorithm(**params) -> FedMMKT:
    return FedMMKT(FedMMKT.Config(**params))


def _reply(counts) -> Message:
    return Message("fit_reply", {}, {"class_counts": np.array(counts, np.int64)})


SOFT = np.array(
    [
        [0.7, 0.2, 0.1],  # prompt 0, ensemble agrees
        [0.6, 0.3, 0.1],  # prompt 1, ensemble says 0
        [0.4, 0.4, 0.2],  # prompt 2, nobody holds class 2
    ],
    np.float32,
)
PROMPTS = np.array([0, 1, 2])


def test_ensemble_targets_are_the_soft_labels():
    targets, trusted = _algorithm(client_targets="ensemble").distill_targets(SOFT, PROMPTS, {0: _reply([5, 5, 0])})
    np.testing.assert_array_equal(targets, SOFT)
    assert trusted is None  # no prompt knowledge: no prompt_trusted_rate


def test_agreed_targets_trust_the_prompt_where_the_ensemble_agrees_or_cannot_know():
    algorithm = _algorithm(client_targets="agreed", prompt_weight=0.5)
    targets, trusted = algorithm.distill_targets(SOFT, PROMPTS, {0: _reply([5, 5, 0]), 1: _reply([1, 0, 0])})
    assert trusted.tolist() == [True, False, True]
    np.testing.assert_allclose(targets[0], [0.85, 0.1, 0.05])  # 0.5·q + 0.5·onehot(0)
    np.testing.assert_allclose(targets[1], SOFT[1])  # contradicted: the ensemble's own label
    np.testing.assert_allclose(targets[2], [0.2, 0.2, 0.6])
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    # Without class counts (withheld under DP) only agreement can trust a prompt.
    _, trusted = algorithm.distill_targets(SOFT, PROMPTS, {0: Message("fit_reply", {}, {})})
    assert trusted.tolist() == [True, False, False]


def test_prompt_targets_trust_every_prompt():
    targets, trusted = _algorithm(client_targets="prompt", prompt_weight=1.0).distill_targets(SOFT, PROMPTS, {})
    np.testing.assert_array_equal(targets, np.eye(3, dtype=np.float32))
    assert trusted.all()


def test_feddf_cannot_take_server_knowledge():
    from fedmmkt_core.errors import RecipeError

    recipe = RECIPE.replace("name: fedmmkt, params: {", "name: feddf, params: {client_targets: agreed, ")
    with pytest.raises(RecipeError, match="client_targets"):
        parse_recipe(recipe)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_no_feedback_control_fine_tunes_on_as_many_pairs_as_fedmmkt_keeps():
    """FedMMKT's loss keeps the 4 pairs the clients agree with; the control draws 4 pairs at random,
    all counted as aligned, so the generator runs the same steps on the same number of pairs."""
    from types import SimpleNamespace

    from fedmmkt_plugins.algorithms.fedmmkt_no_feedback import FedMMKTNoFeedback
    from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss

    from fedmmkt_core.data import TaskSpec
    from fedmmkt_core.interfaces import AlignmentBatch
    from fedmmkt_core.seeding import derive_seed

    task = TaskSpec(("a", "b", "c"), image_size=8, channels=1)
    class_ids = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    soft = np.full((10, 3), 0.1, np.float32)
    soft[np.arange(10), (class_ids + 1) % 3] = 0.8  # the clients see another class...
    soft[[0, 4, 5, 9]] = np.eye(3, dtype=np.float32)[class_ids[[0, 4, 5, 9]]] * 0.7 + 0.1  # ...except on 4 pairs
    prompts = [task.prompt(c) for c in range(3)]
    images = np.arange(10, dtype=np.uint8).repeat(64).reshape(10, 8, 8, 1)  # image j is all j
    seen = AlignmentBatch(images, [prompts[c] for c in class_ids], class_ids, soft, prompts)
    loss = WeightedDenoisingLoss(WeightedDenoisingLoss.Config(threshold=0.5))
    assert loss.active(seen).sum() == 4
    ctx = SimpleNamespace(alignment_losses=[(loss, 1.0)], task=task, seed_for=lambda *keys: derive_seed(5, *keys))
    control = FedMMKTNoFeedback(FedMMKTNoFeedback.Config())
    control.class_prompts = prompts
    batch = control._control_batch(ctx, seen, round_index=2)
    assert len(batch) == 4 and loss.active(batch).all()
    np.testing.assert_array_equal(batch.soft_labels, np.eye(3, dtype=np.float32)[batch.class_ids])
    chosen = batch.images[:, 0, 0, 0]
    np.testing.assert_array_equal(batch.class_ids, class_ids[chosen])  # real pairs of the set, prompts kept
    np.testing.assert_array_equal(chosen, control._control_batch(ctx, seen, round_index=2).images[:, 0, 0, 0])


def test_centralized_is_the_pooled_upper_bound_and_moves_no_bytes(tmp_path):
    recipe = parse_recipe(RECIPE.replace("name: fedmmkt,", "name: centralized,"))
    summary = Runner(recipe, tmp_path / "run").run()
    rows = _rows(tmp_path / "run")
    assert summary["bytes_up_per_client_round"] == 0 and summary["bytes_down_per_client_round"] == 0
    assert rows[-1]["client_accuracy_mean"] > 0.5  # three identical CNNs on the pooled data
    assert len(set(rows[-1]["client_accuracy"].values())) == 1  # one model per architecture
    assert rows[0]["generator_pool"] == len(load_data_train(recipe))  # the pooled real images
    assert "generator_cas" in rows[-1]


def load_data_train(recipe):
    from fedmmkt_core.loading import load_data

    return load_data(recipe)[0].train


def test_typeset_digits_are_deterministic_8x8_and_captioned():
    config = TypesetDigitsDataset.Config(per_class=6, test_fraction=0.2, oracle_fraction=0.0)
    first = TypesetDigitsDataset(config).load(seed=3)
    again = TypesetDigitsDataset(config).load(seed=3)
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert first.train.images.shape[1:] == (8, 8, 1) and first.train.images.dtype == np.uint8
    assert len(first.train) + len(first.test) == 60
    assert first.train.images.max() == 255 and first.train.images.min() == 0
    assert all(c.startswith("a photo of the digit ") and c.endswith(" type") for c in first.train.captions)
    other = TypesetDigitsDataset(config).load(seed=4)
    assert not np.array_equal(first.train.images, other.train.images)


def test_data_public_replaces_the_public_split_and_must_name_the_same_classes(tmp_path):
    text = RECIPE.replace(
        "  partitioner: {name: dirichlet, params: {alpha: 1.0}}",
        "  partitioner: {name: dirichlet, params: {alpha: 1.0}}\n"
        "  public: {name: typeset-digits, params: {per_class: 5, test_fraction: 0.2, oracle_fraction: 0.0}}",
    )
    data = load_server_data(parse_recipe(text))
    assert len(data.public) == 50  # every image of the public dataset, whatever its own splits
    assert data.public.captions[0].endswith("type")
    folder = tmp_path / "shapes"
    for name in ("circle", "square"):
        (folder / name).mkdir(parents=True)
        from PIL import Image

        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / name / f"{i}.png")
    wrong = text.replace(
        "public: {name: typeset-digits, params: {per_class: 5, test_fraction: 0.2, oracle_fraction: 0.0}}",
        f"public: {{name: imagefolder, params: {{root: {folder}, test_fraction: 0.3, oracle_fraction: 0.0}}}}",
    )
    # caught by validate (the folder's class names are listed, no image read): missing and extra named
    with pytest.raises(RecipeError, match=r"data.public .* has classes .* the clients' dataset has .*extra \['circle'"):
        load_server_data(parse_recipe(wrong))


def test_judged_policy_gives_each_class_the_source_the_clients_agree_with_more():
    algorithm = _algorithm(samples_per_class=10, base_fraction=0.5, transfer_policy="judged", probe_fraction=0.2)
    algorithm.class_prompts = ["zero", "one", "two"]
    class_ids = np.repeat(np.arange(3), 10)
    from_base = algorithm.base_mask(class_ids)  # round 1: base_fraction of every class
    assert from_base.reshape(3, 10).sum(axis=1).tolist() == [5, 5, 5]
    alignment = np.where(from_base, 0.5, 0.5).astype(np.float32)
    alignment[(class_ids == 0) & ~from_base] = 0.6  # class 0: the adapter's images agree by 0.1 more
    alignment[(class_ids == 1) & ~from_base] = 0.1  # class 1: far less
    metrics = algorithm.judge_sources(alignment, class_ids, from_base)
    expected = [1 / (1 + np.exp(-1.0)), 0.2, 0.5]  # sigmoid(0.1 / 0.1); clipped at the probe floor; a tie
    np.testing.assert_allclose(algorithm.adapter_share, expected, rtol=1e-6)
    assert metrics["adapter_images"] == 15
    np.testing.assert_allclose(metrics["alignment_adapter"], (0.6 + 0.1 + 0.5) / 3, rtol=1e-6)
    assert metrics["alignment_base"] == 0.5
    np.testing.assert_allclose(metrics["adapter_share_next"], np.mean(expected))
    # Next round: round(10 * share) adapter images per class, the rest from the base.
    assert algorithm.base_mask(class_ids).reshape(3, 10).sum(axis=1).tolist() == [3, 8, 5]
    values, arrays = algorithm.state()
    resumed = _algorithm(samples_per_class=10, base_fraction=0.5, transfer_policy="judged")
    resumed.load_state(values, arrays)
    np.testing.assert_array_equal(resumed.adapter_share, algorithm.adapter_share)


def test_fixed_policy_keeps_base_fraction_and_judged_needs_generate_base():
    fixed = _algorithm(samples_per_class=4, base_fraction=0.25)
    fixed.class_prompts = ["zero", "one"]
    class_ids = np.repeat(np.arange(2), 4)
    assert fixed.base_mask(class_ids).tolist() == [True, False, False, False] * 2
    metrics = fixed.judge_sources(np.full(8, 0.5, np.float32), class_ids, fixed.base_mask(class_ids))
    assert fixed.adapter_share is None and "adapter_share_next" not in metrics
    assert _algorithm(transfer_policy="judged").generator_requirements() == {"generate_base": "params.transfer_policy"}
    assert _algorithm(base_fraction=0.0).generator_requirements() == {}


def test_fine_tune_on_base_trains_the_adapter_on_the_base_images_only_while_clients_see_both(tmp_path):
    recipe = parse_recipe(
        RECIPE.replace("name: fedmmkt, params: {", "name: fedmmkt, params: {base_fraction: 0.5, fine_tune_on: base, ")
    )
    Runner(recipe, tmp_path / "run").run()
    rows = _rows(tmp_path / "run")
    assert [row["synthetic_images"] for row in rows] == [40, 40]  # the clients score and distil on both sources
    assert [row["adapter_images"] for row in rows] == [20, 20]
    assert [row["generator_pool"] for row in rows] == [20, 40]  # the base's 20 per round, replayed
    with pytest.raises(RecipeError, match=r"algorithm.params.fine_tune_on.*base_fraction: 0 draws none"):
        parse_recipe(RECIPE.replace("name: fedmmkt, params: {", "name: fedmmkt, params: {fine_tune_on: base, "))


def test_ceiling_generator_clients_see_only_the_generator_fine_tuned_on_pooled_real_images(tmp_path):
    recipe = parse_recipe(
        RECIPE.replace("name: fedmmkt, params: {", "name: fedmmkt-ceiling-generator, params: {base_fraction: 1.0, ")
    )
    Runner(recipe, tmp_path / "run").run()
    rows = _rows(tmp_path / "run")
    assert all(row["adapter_images"] == row["synthetic_images"] for row in rows)  # no image from the base
    assert rows[0]["generator_pool"] == len(load_data_train(recipe))  # the pooled real images, not feedback
    assert rows[-1]["bytes_up_total"] > 0  # the clients still report logits on the transfer set


def test_sharpened_feddf_divides_the_ensembles_temperature_and_ignores_the_prompt():
    from fedmmkt_plugins.algorithms.feddf_sharpened import FedDFSharpened

    algorithm = FedDFSharpened(FedDFSharpened.Config(sharpen=0.5, kd_temperature=2.0))
    logits = {0: np.array([[2.0, 0.0, 0.0]], np.float32), 1: np.array([[0.0, 0.0, 0.0]], np.float32)}
    replies = {k: Message("fit_reply", {}, {"logits": v}) for k, v in logits.items()}
    mean = np.array([1.0, 0.0, 0.0])  # the clients' mean logits; temperature 2 · 0.5 = 1
    np.testing.assert_allclose(algorithm.aggregate(0, replies)[0], np.exp(mean) / np.exp(mean).sum(), rtol=1e-6)
    plain = FedDFSharpened(FedDFSharpened.Config(sharpen=1.0, kd_temperature=2.0)).aggregate(0, replies)[0]
    assert plain[0] < algorithm.aggregate(0, replies)[0][0]  # sharpening raises the top class's share
    with pytest.raises(ValueError):
        FedDFSharpened.Config(client_targets="agreed")


def test_entropy_selection_keeps_each_class_least_certain_images():
    algorithm = _algorithm(samples_per_class=2, transfer_candidates=2, transfer_selection="entropy")
    soft = np.array(
        [
            [0.9, 0.1],  # class 0: entropy 0.325
            [0.5, 0.5],  # 0.693: the hardest
            [0.6, 0.4],  # 0.673
            [0.99, 0.01],  # 0.056
            [0.2, 0.8],  # class 1: 0.500
            [0.1, 0.9],  # 0.325
            [0.3, 0.7],  # 0.611
            [0.2, 0.8],  # 0.500, a tie with image 4: the earlier image wins
        ],
        np.float32,
    )
    class_ids = np.repeat(np.arange(2), 4)
    assert algorithm.select_transfer(soft, class_ids, {}).tolist() == [1, 2, 4, 6]
    assert algorithm.candidates_per_class() == 4
    assert _algorithm(samples_per_class=2).select_transfer(soft, class_ids, {}).tolist() == list(range(8))
    # the base's share is taken of every class's candidates
    mixed = _algorithm(samples_per_class=2, transfer_candidates=2, base_fraction=0.5)
    assert mixed.base_mask(class_ids).tolist() == [True, True, False, False] * 2


def test_disagreement_selection_keeps_the_images_the_clients_disagree_on_not_the_unrecognisable():
    from fedmmkt_plugins.algorithms.hardness import disagreement

    big = np.log(9.0)  # softmax([log 9, 0]) = [0.9, 0.1]
    first = np.array([[big, 0], [0, 0], [big, 0], [big, 0]], np.float32)
    second = np.array([[0, big], [0, 0], [big, 0], [0, 0]], np.float32)
    # image 0: confident and opposed; 1: both unsure (the highest entropy, no disagreement); 2: agreed;
    # 3: one sure, one unsure
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    expected = [np.log(2) - h, 0.0, 0.0, -(0.7 * np.log(0.7) + 0.3 * np.log(0.3)) - (h + np.log(2)) / 2]
    np.testing.assert_allclose(disagreement([first, second]), expected, atol=1e-6)
    algorithm = _algorithm(samples_per_class=1, transfer_candidates=2)  # transfer_selection: disagreement
    replies = {k: Message("fit_reply", {}, {"logits": x}) for k, x in enumerate([first, second])}
    soft = np.full((4, 2), 0.5, np.float32)
    assert algorithm.select_transfer(soft, np.array([0, 0, 1, 1]), replies).tolist() == [0, 3]


def test_agreed_disagreement_selection_ranks_what_the_federation_reads_as_the_prompt_first():
    big = np.log(9.0)
    first = np.array([[big, 0], [0, 0], [big, 0], [0, big], [0, big], [0, 0]], np.float32)
    second = np.array([[0, big], [0, 0], [0, big], [0, big], [big, 0], [0, 0]], np.float32)
    replies = {k: Message("fit_reply", {}, {"logits": x}) for k, x in enumerate([first, second])}
    # class 0 (images 0-2): 0 and 2 are opposed (the hardest) but only 2 does the federation read as a 0
    # class 1 (images 3-5): none is read as a 1, so the plain disagreement ranking decides: 4 (opposed), then 3
    soft = np.array([[0.4, 0.6], [0.45, 0.55], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1]], np.float32)
    class_ids = np.array([0, 0, 0, 1, 1, 1])
    agreed_first = _algorithm(samples_per_class=1, transfer_candidates=3, transfer_selection="agreed-disagreement")
    assert agreed_first.select_transfer(soft, class_ids, replies).tolist() == [2, 4]
    plain = _algorithm(samples_per_class=2, transfer_candidates=3)  # disagreement: ties (0 and 2) to the earlier
    assert plain.select_transfer(soft, class_ids, replies).tolist() == [0, 2, 3, 4]
    two = _algorithm(samples_per_class=2, transfer_candidates=3, transfer_selection="agreed-disagreement")
    assert two.select_transfer(soft, class_ids, replies).tolist() == [0, 2, 3, 4]  # then the hardest of the rest


def test_hard_sample_transfer_scores_every_candidate_and_sends_only_the_chosen(tmp_path, monkeypatch):
    sent = []
    original = FedMMKT._fit_message

    def recording(self, ctx, round_index, client_id, images, class_ids=None):
        message = original(self, ctx, round_index, client_id, images, class_ids)
        sent.append((round_index, len(message.arrays["predict_images"]), len(message.arrays.get("distill_images", []))))
        return message

    monkeypatch.setattr(FedMMKT, "_fit_message", recording)
    recipe = parse_recipe(
        RECIPE.replace("name: fedmmkt, params: {", "name: fedmmkt, params: {transfer_candidates: 3, ")
    )
    Runner(recipe, tmp_path / "run").run()
    rows = _rows(tmp_path / "run")
    assert [row["synthetic_images"] for row in rows] == [120, 120]  # 10 classes x 4 x 3 scored
    assert [row["transfer_images"] for row in rows] == [40, 40]
    assert sorted(set(sent)) == [(0, 120, 0), (1, 120, 40)]  # next round distils on the 40 chosen
    assert all(0 < row["transfer_entropy"] for row in rows)


def test_this_round_distillation_labels_the_rounds_set_first_and_distils_on_it_in_the_same_round(tmp_path, monkeypatch):
    from fedmmkt_core.client import ClientRuntime

    seen = []  # (client, message type, arrays) as each client received them
    original = ClientRuntime.handle

    def recording(self, message):
        seen.append((self.client_id, message.type, dict(message.arrays)))
        return original(self, message)

    monkeypatch.setattr(ClientRuntime, "handle", recording)
    recipe = RECIPE.replace("name: fedmmkt, params: {", "name: fedmmkt, params: {distill_on: this-round, ")
    Runner(parse_recipe(recipe.replace("rounds: 2", "rounds: 3")), tmp_path / "run").run()
    client_zero = [(kind, sorted(arrays)) for client, kind, arrays in seen if client == 0]
    assert client_zero == [
        ("fit", ["predict_images"]),  # round 1 as before: untrained clients cannot label, so they train first
        ("predict", ["images"]),  # round 2: label the round's own set ...
        ("fit", ["distill_images", "distill_soft_labels"]),  # ... then distil on it
        ("predict", ["images"]),
        ("fit", ["distill_images", "distill_soft_labels"]),
    ]
    messages = [arrays for client, _, arrays in seen if client == 0]
    for labelled, distilled in ((messages[1], messages[2]), (messages[3], messages[4])):
        np.testing.assert_array_equal(distilled["distill_images"], labelled["images"])  # the same round's set
    assert not np.array_equal(messages[1]["images"], messages[3]["images"])
    rows = _rows(tmp_path / "run")
    assert all("train_loss" in row and "client_accuracy_mean" in row and not row["failures"] for row in rows)


def test_weighted_denoising_weightings_by_hand():
    """a = (0.9, 0.6, 0.4, 0.5): threshold 0.5 keeps the first, second and fourth; hard counts them once,
    soft by a, uncertain by 1 - a (the surest pair counts least)."""
    from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss

    from fedmmkt_core.interfaces import AlignmentBatch

    class_ids = np.array([0, 1, 0, 1])
    alignment = np.array([0.9, 0.6, 0.4, 0.5])
    soft = np.stack([alignment, 1 - alignment], axis=1)
    soft[[1, 3]] = soft[[1, 3], ::-1]  # classes 1: a_j is the second column
    batch = AlignmentBatch(np.zeros((4, 8, 8, 1), np.uint8), ["a", "b", "a", "b"], class_ids, soft, ["a", "b"])
    expected = {"hard": [1, 1, 0, 1], "soft": [0.9, 0.6, 0, 0.5], "uncertain": [0.1, 0.4, 0, 0.5]}
    for weighting, weights in expected.items():
        loss = WeightedDenoisingLoss(WeightedDenoisingLoss.Config(threshold=0.5, weighting=weighting))
        np.testing.assert_allclose(loss.weights(batch), weights, atol=1e-12)


def test_the_feedback_warmup_fine_tunes_on_every_pair_counted_aligned_then_the_clients_filter(tmp_path, monkeypatch):
    """Round 1 of a one-round warm-up: the adapter sees each pair with its prompt's one-hot (a_j = 1, all kept
    at threshold 0.5); round 2: the replayed round-1 pairs carry their real soft labels again, so they are filtered."""
    from test_inversion import spy_on_the_generator

    _, trained = spy_on_the_generator(monkeypatch)
    overrides = ["algorithm.params.feedback_warmup_rounds=1", 'alignment_losses=[{"name": "weighted-denoising"}]']
    Runner(parse_recipe(RECIPE, overrides=overrides), tmp_path / "warm").run()
    first, second = trained
    np.testing.assert_array_equal(first.soft_labels, np.eye(10, dtype=np.float32)[first.class_ids])
    replayed = second.subset(np.arange(len(first)))
    np.testing.assert_array_equal(replayed.images, first.images)  # the replay: round 1's pairs, first
    assert not np.array_equal(replayed.soft_labels, first.soft_labels)  # ...with the clients' real verdict
    assert np.all(np.isclose(replayed.soft_labels.sum(axis=1), 1.0, atol=1e-3))

    trained.clear()
    Runner(parse_recipe(RECIPE, overrides=overrides[1:]), tmp_path / "cold").run()
    np.testing.assert_array_equal(trained[0].images, first.images)  # the same pairs, warm-up or not
    np.testing.assert_array_equal(trained[1].soft_labels[: len(first)], replayed.soft_labels)
    assert not np.array_equal(trained[0].soft_labels, first.soft_labels)


def test_the_ceiling_at_the_adapter_s_share_draws_the_rest_from_the_frozen_base(tmp_path):
    recipe = parse_recipe(
        RECIPE.replace(
            "name: fedmmkt, params: {",
            "name: fedmmkt-ceiling-generator, params: {ceiling_images: adapter-share, base_fraction: 0.5, ",
        )
    )
    Runner(recipe, tmp_path / "run").run()
    rows = _rows(tmp_path / "run")
    assert all(2 * row["adapter_images"] == row["synthetic_images"] for row in rows)  # half the base's
    assert rows[0]["generator_pool"] == len(load_data_train(recipe))  # the adapter still learns the pooled images
    with pytest.raises(RecipeError, match="ceiling_images"):
        parse_recipe(
            RECIPE.replace(
                "name: fedmmkt, params: {", "name: fedmmkt-ceiling-generator, params: {ceiling_images: some, "
            )
        )
