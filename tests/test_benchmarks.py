"""The benchmark machinery: its arithmetic, its timer, and docs/results.md and README's headline being in sync."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import ablations, quality, readme  # noqa: E402
from benchmarks.common import spread  # noqa: E402
from benchmarks.cost import ComputeTimer  # noqa: E402
from benchmarks.scale import slope  # noqa: E402


def test_slope_is_the_least_squares_fit():
    assert slope([5, 20, 100], [10.0, 25.0, 105.0]) == pytest.approx(1.0)
    assert slope([1, 2, 3], [2.0, 1.0, 3.0]) == pytest.approx(0.5)  # by hand: Σ(dx·dy)/Σdx² = 1/2
    assert slope([4, 4], [1.0, 2.0]) == 0.0


def test_spread_gives_mean_std_and_min_median_max():
    s = spread([1.0, 2.0, 6.0])
    assert (s["mean"], s["min"], s["median"], s["max"], s["n"]) == (3.0, 1.0, 2.0, 6.0, 3)
    assert s["std"] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)


def test_compute_timer_counts_nested_calls_once_and_restores_the_methods():
    now = [0.0]  # a fake clock: each method "takes" a known time, so the sums are exact

    class Model:
        def inner(self):
            now[0] += 2.0

        def outer(self):
            self.inner()
            now[0] += 3.0

    original = Model.outer
    timer = ComputeTimer(clock=lambda: now[0])
    timer.wrap(Model, "outer", "outer")
    timer.wrap(Model, "inner", "inner")
    Model().outer()
    Model().inner()
    seconds, calls = timer.take()
    assert calls == {"outer": 1, "inner": 1}  # the inner call inside outer is outer's time
    assert seconds == {"outer": 5.0, "inner": 2.0}
    timer.restore()
    assert Model.outer is original and timer.take() == ({}, {})


def test_quality_summary_averages_over_seeds_per_cell():
    runs = [
        {"client_set": "homogeneous", "alpha": 0.5, "seed": s, "algorithm": a, "client_accuracy_mean": acc}
        for s, a, acc in [(0, "fedmmkt", 0.8), (1, "fedmmkt", 0.6), (0, "local", 0.5)]
    ]
    table = quality.summarize(runs)
    assert [row["algorithm"] for row in table] == ["local", "fedmmkt"]  # in ALGORITHMS order
    assert table[1]["client_accuracy_mean"]["mean"] == pytest.approx(0.7)
    assert table[1]["seeds"] == [0, 1]


def test_quality_runs_under_other_generator_training_are_labelled(tmp_path):
    recipe = tmp_path / "r.yaml"
    demo = (ROOT / "examples" / "digits.yaml").read_text()
    recipe.write_text(re.sub(r"pretrain: \{[^}]*\}", "pretrain: {steps: 40}", demo))
    current = quality.generator_training(recipe)
    assert current["pretrain"]["steps"] == 40 and current["pretrain"]["batch_size"] == 64  # defaults filled in
    assert current["fine_tune"]["fine_tune_steps"] == 150 and current["fine_tune"]["lr"] == 1e-3
    earlier = {**current, "pretrain": {**current["pretrain"], "steps": 1500}}
    weighted = {**current, "fine_tune": {**current["fine_tune"], "fine_tune_snr_gamma": 2.0}}
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0}
    runs = [
        {**cell, "algorithm": a, **t, "client_accuracy_mean": v}
        for a, t, v in [
            ("fedmmkt", earlier, 0.6),
            ("fedmmkt", current, 0.8),
            ("local", {}, 0.5),
            ("fedmmkt", weighted, 0.4),
        ]
    ]
    rows = quality.summarize(runs, current)
    other = "fedmmkt (another generator training)"
    assert [r["algorithm"] for r in rows] == ["local", "fedmmkt", other, other]  # two earlier trainings, not pooled
    assert [r["client_accuracy_mean"]["mean"] for r in rows[:2]] == [0.5, 0.8]
    assert sorted(r["client_accuracy_mean"]["mean"] for r in rows[2:]) == [0.4, 0.6]
    assert readme.display_name(rows[2]["algorithm"]) == "FedMMKT, another generator training"
    assert len({quality.merge_key(r) for r in runs}) == 4
    assert readme.other_training(runs, current) == "`pretrain.steps=1500`; or `fine_tune_snr_gamma=2.0`"


def test_runs_drawn_at_another_guidance_are_labelled_even_when_measured_before_it_was_recorded():
    sampling = {"num_inference_steps": 10, "guidance_scale": 1.5, "adapter_guidance_scale": None}
    current = {"pretrain": None, "fine_tune": None, "sampling": sampling}
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0, "pretrain": None, "fine_tune": None}
    runs = [
        {**cell, "algorithm": "feddf", "client_accuracy_mean": 0.7},  # recorded before sampling was: guidance 3
        {**cell, "algorithm": "feddf", "sampling": sampling, "client_accuracy_mean": 0.8},
        {**cell, "algorithm": "local", "client_accuracy_mean": 0.5},  # no generator
    ]
    assert [quality.label(r, current) for r in runs] == ["feddf (another generator training)", "feddf", "local"]
    assert len({quality.merge_key(r) for r in runs}) == 3
    assert readme.other_training(runs, current) == "`guidance_scale=3.0`"
    recorded = quality.generator_training(ROOT / "examples" / "digits.yaml")["sampling"]
    assert set(recorded) == set(quality.SAMPLING_FIELDS) and recorded["num_inference_steps"] == 10


def test_runs_with_another_transfer_set_are_labelled_even_when_measured_before_it_was_recorded():
    current = {"pretrain": None, "fine_tune": None, "transfer": {"base_fraction": 0.5, "transfer_policy": "fixed"}}
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0, "pretrain": None, "fine_tune": None}
    old_style = 'algorithm={"name": "fedmmkt", "params": {"base_fraction": 1.0}}'  # no "transfer" field
    runs = [
        {**cell, "algorithm": "fedmmkt", "overrides": ["seed=0", old_style], "client_accuracy_mean": 0.7},
        {**cell, "algorithm": "fedmmkt", "transfer": current["transfer"], "client_accuracy_mean": 0.8},
        {**cell, "algorithm": "fedmmkt-ceiling-generator", "overrides": [old_style], "client_accuracy_mean": 0.9},
    ]
    assert [quality.label(r, current) for r in runs] == [
        "fedmmkt (another generator training)",
        "fedmmkt",
        "fedmmkt-ceiling-generator",  # its set is never the base's
    ]
    assert len({quality.merge_key(r) for r in runs}) == 3
    assert readme.other_training(runs, current) == "`base_fraction=1.0`"


def test_runs_fine_tuned_with_other_alignment_losses_are_labelled_where_the_losses_reach_them():
    recipe_losses = [
        {"name": "weighted-denoising", "params": {"threshold": 0.5}},
        {"name": "ensemble-ce", "weight": 0.1},
    ]
    training = {"pretrain": None, "fine_tune": None, "transfer": quality.transfer_settings({})}
    current = {**training, "alignment": quality.alignment_settings(recipe_losses)}
    assert current["alignment"][1]["params"]["student_epochs"] == 15  # defaults filled in
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0, **training}
    runs = [
        {**cell, "algorithm": "fedmmkt"},  # recorded before the losses were: weighted denoising alone
        {**cell, "algorithm": "fedmmkt", "alignment": current["alignment"]},
        {**cell, "algorithm": "fedmmkt-no-feedback"},
        {**cell, "algorithm": "fedmmkt-frozen-generator"},  # never fine-tunes: the losses cannot reach it
        {**cell, "algorithm": "feddf-sharpened"},
    ]
    assert [quality.label(r, current) for r in runs] == [
        "fedmmkt (another generator training)",
        "fedmmkt",
        "fedmmkt-no-feedback (another generator training)",
        "fedmmkt-frozen-generator",
        "feddf-sharpened",
    ]
    assert len({quality.merge_key(r) for r in runs[:2]}) == 2
    assert readme.other_training(runs[:2], current) == "`alignment_losses=1·weighted-denoising`"


def test_hard_sample_selection_labels_fedmmkts_runs_and_never_reaches_feddf(tmp_path):
    recorded_before_selection = {"base_fraction": 0.5, "transfer_policy": "fixed"}  # ran candidates 1, fine_tune all
    selecting = {**recorded_before_selection, "transfer_candidates": 2, "transfer_selection": "disagreement"}
    current = {"pretrain": None, "fine_tune": None, "transfer": {**selecting, "fine_tune_on": "base"}}
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0, "pretrain": None, "fine_tune": None}
    runs = [
        {**cell, "algorithm": "fedmmkt", "transfer": recorded_before_selection},
        {**cell, "algorithm": "fedmmkt", "transfer": current["transfer"]},
        {**cell, "algorithm": "fedmmkt-ceiling-generator", "transfer": {"base_fraction": 0.0}},  # before selection
        {**cell, "algorithm": "fedmmkt-ceiling-generator", "transfer": selecting},  # base_fraction is not its own
    ]
    assert [quality.label(r, current) for r in runs] == [
        "fedmmkt (another generator training)",
        "fedmmkt",
        "fedmmkt-ceiling-generator (another generator training)",
        "fedmmkt-ceiling-generator",
    ]
    assert readme.other_training(runs[:2], current) == (
        "`fine_tune_on=all, transfer_candidates=1`"  # disagreement is the default rule
    )
    smoke = (Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml").read_text()
    params = "params: {samples_per_class: 20, eval_samples_per_class: 10}"
    assert params in smoke
    recipe = tmp_path / "selecting.yaml"
    recipe.write_text(smoke.replace(params, "params: {samples_per_class: 20, transfer_candidates: 2}"))
    for algorithm, selects in (("fedmmkt", True), ("fedmmkt-frozen-generator", True), ("feddf", False)):
        spec = quality.overrides_for("heterogeneous", 0.5, 0, algorithm, 2, recipe)[-2].split("=", 1)[1]
        assert ("transfer_candidates" in json.loads(spec)["params"]) is selects, algorithm


def test_fedavg_cells_only_for_one_architecture():
    cells = [(c, a) for c in quality.CLIENT_SETS for a in quality.ALGORITHMS if quality.valid(a, c)]
    assert ("heterogeneous", "fedavg") not in cells and ("homogeneous", "fedavg") in cells
    assert len(cells) == 17  # 9 algorithms on one client set, 8 on the other


def test_ablation_runs_around_an_earlier_default_are_labelled_and_not_reused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  name: fedmmkt\n  params: {base_fraction: 1.0, kd_weight: 1.0}\n")
    current = ablations.baseline(recipe)
    assert current == {"base_fraction": 1.0, "kd_weight": 1.0}
    old = {"client_set": "heterogeneous", "alpha": 0.5, "seed": 0, "variant": "kd_weight=2",
           "baseline": {"base_fraction": 0.5, "kd_weight": 1.0}, "client_accuracy_mean": 0.6}  # fmt: skip
    new = {**old, "baseline": current, "client_accuracy_mean": 0.8}
    rows = ablations.summarize([old, new], current)
    assert [r["variant"] for r in rows] == ["kd_weight=2", "kd_weight=2 (around base_fraction=0.5)"]
    assert [r["client_accuracy_mean"]["mean"] for r in rows] == [0.8, 0.6]


def test_readme_results_section_matches_the_result_files():
    text = readme.RESULTS_DOC.read_text(encoding="utf-8")
    generated = text.split(readme.BEGIN, 1)[1].split(readme.END, 1)[0]
    assert readme.BEGIN + generated + readme.END == readme.render(), "run: python -m benchmarks readme"
    archive = text.split(readme.ARCHIVE_BEGIN, 1)[1].split(readme.ARCHIVE_END, 1)[0]
    assert readme.ARCHIVE_BEGIN + archive + readme.ARCHIVE_END == readme.render_archive()
    assert "split, before the latent fix" not in generated and "seed, before the latent fix" not in generated
    headline = readme.README.read_text(encoding="utf-8")
    generated = headline.split(readme.HEADLINE_BEGIN, 1)[1].split(readme.HEADLINE_END, 1)[0]
    assert readme.HEADLINE_BEGIN + generated + readme.HEADLINE_END == readme.render_headline()
    assert "| **FedMMKT** |" in generated or "not measured yet under the current recipe" in generated
    assert "another generator training" not in generated  # the headline shows the current recipe only


def test_sd_shaped_summary_has_the_issue_fields():
    from benchmarks.sd_shaped import ratio, summarise

    assert ratio([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 2.0  # bare median over toolkit median: toolkit 2x faster
    steps = {"toolkit": spread([3.0]), "bare": spread([2.0])}
    figures = {
        "generation": {"images_per_second": {"toolkit": spread([5.0]), "bare": spread([5.0])}, "ratio_to_bare": 1.0},
        "fine_tune": {"weighted-denoising": {"steps_per_second": steps, "ratio_to_bare": 1.5}, "before_after": {}},
        "peak_memory_bytes": {"toolkit_generation": 10},
    }
    out = summarise({"float32": figures})
    assert out["generation"]["ratio_to_bare"] == 1.0
    assert out["fine_tune"]["ratio_to_bare"] == {"weighted-denoising": 1.5}
    assert out["fine_tune"]["steps_per_second"] == {"weighted-denoising": 3.0}
    assert out["peak_memory_bytes"] == {"toolkit_generation": 10} and out["by_dtype"]["float32"] is figures


def test_quality_rows_list_every_seed_and_paired_intervals_pair_seeds():
    cell = {"client_set": "heterogeneous", "alpha": 0.5}
    runs = [
        {**cell, "seed": s, "algorithm": a, "client_accuracy_mean": acc, "generator_cas": cas,
         "generator_cas_initial": 0.2}
        for s, a, acc, cas in [
            (1, "fedmmkt", 0.80, 0.5), (0, "fedmmkt", 0.70, 0.4), (2, "fedmmkt", 0.75, 0.3),
            (0, "fedmmkt-frozen-generator", 0.60, 0.2), (1, "fedmmkt-frozen-generator", 0.72, 0.2),
        ]
    ]  # fmt: skip
    rows = {r["algorithm"]: r for r in quality.summarize(runs)}
    assert rows["fedmmkt"]["seeds"] == [0, 1, 2]
    assert rows["fedmmkt"]["client_accuracy_mean"]["per_seed"] == [0.70, 0.80, 0.75]
    comparisons = {p["comparison"]: p for p in quality.paired(runs)}
    loop = comparisons["clients: FedMMKT - frozen generator (the loop)"]
    assert loop["seeds"] == [0, 1] and loop["per_seed"] == pytest.approx([0.10, 0.08])
    half = 12.706 * 0.01  # t(0.975, 1) · stdev([0.10, 0.08]) / sqrt(2)
    assert loop["mean"] == pytest.approx(0.09) and loop["high"] - loop["mean"] == pytest.approx(half, rel=1e-3)
    start = comparisons["CAS: FedMMKT - its start"]
    assert start["seeds"] == [0, 1, 2] and start["per_seed"] == pytest.approx([0.2, 0.3, 0.1])
    runs[3]["generator_cas_initial"] = 0.25  # seed 0's frozen run started from another base or oracle
    loop = {p["comparison"]: p for p in quality.paired(runs)}["clients: FedMMKT - frozen generator (the loop)"]
    assert loop["seeds"] == [1] and loop["per_seed"] == pytest.approx([0.08])


def test_ablation_pairs_each_variant_with_the_reference_and_its_start_per_seed():
    cell = {"client_set": "heterogeneous", "alpha": 0.5, "baseline": None}
    runs = [
        {**cell, "seed": s, "variant": v, "client_accuracy_mean": acc, "generator_cas": cas,
         "generator_cas_initial": 0.3, "generator_fid": 100.0, "generator_fid_initial": 110.0}
        for s, v, acc, cas in [
            (0, "fedmmkt", 0.70, 0.40), (1, "fedmmkt", 0.72, 0.35),
            (0, "transfer=judged", 0.75, 0.45), (1, "transfer=judged", 0.74, 0.30), (2, "transfer=judged", 0.9, 0.9),
        ]
    ]  # fmt: skip
    rows = {r["comparison"]: r for r in ablations.paired_vs(runs, "fedmmkt")}
    clients = rows["client_accuracy_mean: transfer=judged - fedmmkt"]
    assert clients["seeds"] == [0, 1] and clients["per_seed"] == pytest.approx([0.05, 0.02])
    start = rows["generator_cas: transfer=judged - its start"]
    assert start["seeds"] == [0, 1, 2] and start["per_seed"] == pytest.approx([0.15, 0.0, 0.6])
    assert rows["generator_fid: fedmmkt - its start"]["per_seed"] == pytest.approx([-10.0, -10.0])
    assert "client_accuracy_mean: fedmmkt - fedmmkt" not in rows
    # an extra pair: two arms of one selection, compared with each other as well as with the reference
    runs += [{**r, "variant": "judged-twin", "client_accuracy_mean": r["client_accuracy_mean"] - 0.01}
             for r in runs if r["variant"] == "transfer=judged"]  # fmt: skip
    rows = {
        r["comparison"]: r for r in ablations.paired_vs(runs, "fedmmkt", pairs=[["transfer=judged", "judged-twin"]])
    }
    twin = rows["client_accuracy_mean: transfer=judged - judged-twin"]
    assert twin["seeds"] == [0, 1, 2] and twin["per_seed"] == pytest.approx([0.01, 0.01, 0.01])
    assert "client_accuracy_mean: judged-twin - transfer=judged" not in rows


def test_allocator_section_shows_both_settings_and_whether_the_metrics_agree():
    def setting(seconds, faults):
        return {"rounds_seconds": spread([seconds, seconds + 2]), "minor_page_faults": spread([faults, faults]),
                "system_seconds": spread([1.0, 2.0]), "peak_rss_mib": spread([900.0, 910.0]),
                "phase_seconds_median": {"synthesize": seconds / 2, "aggregate": 0.0}}  # fmt: skip

    summary = {"tuned": setting(77.0, 2e5), "untuned": setting(84.0, 7.7e6)}
    data = {"command": "python -m benchmarks allocator", "rounds": 3, "machine": {"cpus": 2, "torch_threads": 2},
            "metrics_identical": True, "summary": summary}  # fmt: skip
    text = "\n".join(readme.allocator_section(data))
    assert "| run's thresholds | 78.0 (77.0–79.0) s | 200,000 (200,000–200,000) |" in text
    assert "| glibc's defaults | 85.0 (84.0–86.0) s | 7,700,000" in text
    assert "synthesize" in text and "aggregate" not in text.split("| malloc |")[1].split("\n")[0]
    assert "**True**" in text
    assert readme.allocator_section(None)[-2] == "Not measured yet: `python -m benchmarks allocator`."


def test_a_merged_results_file_records_the_commits_its_runs_were_measured_at(tmp_path):
    """Workers measure in frozen worktrees; the merged file names their commits, not the merging checkout's."""
    import torch

    threads = torch.get_num_threads()
    setting = {"recipe": "examples/digits.yaml", "rounds": 2, "torch_threads": 1}
    run = {"client_set": "heterogeneous", "alpha": 0.5, "algorithm": "local", "client_accuracy_mean": 0.5}
    workers = []
    for seed, commit in ((0, "aaa1111"), (1, "bbb2222")):
        path = tmp_path / f"worker-{seed}.json"
        runs = [{**run, "seed": seed}]
        path.write_text(json.dumps({"setting": setting, "machine": {"commit": commit}, "runs": runs}))
        workers.append(str(path))
    merged = tmp_path / "merged.json"
    try:
        quality.main(["--rounds", "2", "--seeds", "0", "1", "--alphas", "0.5", "--client-sets", "heterogeneous",
                      "--algorithms", "local", "--threads", "1", "--no-run", "--results", str(merged),
                      "--merge-from", *workers])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads(merged.read_text())
    assert data["machine"]["measured_at"] == ["aaa1111", "bbb2222"] and len(data["runs"]) == 2
    assert readme.commits(data["machine"]) == "aaa1111, bbb2222"
    assert "commit aaa1111, bbb2222" in readme.machine_line(data)
    assert readme.commits({"commit": "ccc3333"}) == "ccc3333"  # a file measured where it was written
