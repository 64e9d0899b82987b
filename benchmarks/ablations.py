"""What moves client accuracy and CAS, measured on the validation split (never the test split).

    python -m benchmarks ablations [--recipe examples/digits.yaml] [--alphas 0.1 0.5] [--seeds 0 1]
                                   [--client-sets heterogeneous] [--variants NAME ...] [--rounds 5]

Every variant is the recipe's FedMMKT with one setting changed (``feddf`` is the baseline it must
beat); every run evaluates clients, CAS reference and Fréchet distance on ``data.evaluate_on:
validation``, a split carved from the clients' side. The defaults in ``examples/*.yaml`` and
``FedMMKTConfig`` were chosen from this file; the test split only reports (``benchmarks quality``).
Finished runs are saved at once: a killed benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, atomic_write_json, earlier_commits, machine, merged_machine, set_threads, spread
from .quality import CLIENT_SETS, clients_of, overrides_for

# the demo recipe's hard-sample selection and guidance, which both arms of its loop share
DEMO_SELECTION = [
    "algorithm.params.transfer_candidates=2",
    "algorithm.params.transfer_selection=disagreement",
    "generator.params.guidance_scale=1.5",
]
# class-mean feedback whose adapter trains on every (moved) base image in round 1, counted aligned with its prompt
WARMUP_CLASS_MEANS = ["algorithm.params.class_mean_shift=1.0", "algorithm.params.feedback_warmup_rounds=1"]
VARIANTS: dict[str, list[str]] = {
    "fedmmkt": [],
    "feddf": ["algorithm.name=feddf"],
    "targets=ensemble": ["algorithm.params.client_targets=ensemble"],
    "targets=prompt": ["algorithm.params.client_targets=prompt"],
    "targets=agreed": ["algorithm.params.client_targets=agreed", "algorithm.params.prompt_weight=1.0"],
    "targets=agreed,beta=0.5": ["algorithm.params.client_targets=agreed", "algorithm.params.prompt_weight=0.5"],
    "aggregator=uniform": ["aggregator.params.weighting=uniform"],
    "aggregator=class_aware": ["aggregator.params.weighting=class_aware"],
    "base_fraction=0": ["algorithm.params.base_fraction=0.0"],
    "base_fraction=0.5": ["algorithm.params.base_fraction=0.5"],
    "base_fraction=1": ["algorithm.params.base_fraction=1.0"],
    "transfer=judged": ["algorithm.params.transfer_policy=judged", "algorithm.params.base_fraction=0.5"],
    "base_fraction=0.5,fine_tune_on=base": ["algorithm.params.base_fraction=0.5", "algorithm.params.fine_tune_on=base"],
    "frozen-generator": ["algorithm.name=fedmmkt-frozen-generator"],
    # hard-sample transfer: twice the images scored, each class's hardest half distilled on (by the rule named)
    **{
        f"{arm},candidates=2,{rule}": [
            *source,
            "algorithm.params.transfer_candidates=2",
            f"algorithm.params.transfer_selection={rule}",
        ]
        for rule in ("entropy", "disagreement")
        for arm, source in (
            ("frozen-generator", ["algorithm.name=fedmmkt-frozen-generator"]),
            ("base_fraction=0", ["algorithm.params.base_fraction=0.0"]),
        )
    },
    # the loop's teaching attempts under the same selection: the adapter learns most from the pairs the clients
    # recognise least surely; or it learns only from the base's half while the clients see both halves
    "base_fraction=0,candidates=2,disagreement,weighting=uncertain": [
        "algorithm.params.base_fraction=0.0",
        "algorithm.params.transfer_candidates=2",
        "algorithm.params.transfer_selection=disagreement",
        'alignment_losses=[{"name": "weighted-denoising", "params": {"threshold": 0.5, "weighting": "uncertain"}}]',
    ],
    "base_fraction=0.5,fine_tune_on=base,candidates=2,disagreement": [
        "algorithm.params.base_fraction=0.5",
        "algorithm.params.fine_tune_on=base",
        "algorithm.params.transfer_candidates=2",
        "algorithm.params.transfer_selection=disagreement",
    ],
    # a loss whose gradient carries the clients' knowledge: a student distilled on their soft labels scores the
    # adapter's x̂₀ against the prompt's class (beside the recipe's weighted denoising, at this weight)
    **{
        f"+ensemble-ce={weight}": [
            'alignment_losses=[{"name": "weighted-denoising", "params": {"threshold": 0.5}}, '
            f'{{"name": "ensemble-ce", "weight": {weight}}}]'
        ]
        for weight in (0.01, 0.1, 1.0)
    },
    # the demo's cost (issue 25): one candidate per transfer image halves synthesis (no selection), and half the
    # fine-tuning steps halves the generator update
    "candidates=1": ["algorithm.params.transfer_candidates=1"],
    "candidates=1,fine_tune_steps=75": [
        "algorithm.params.transfer_candidates=1",
        "generator.params.fine_tune_steps=75",
    ],
    "no-feedback": ["algorithm.name=fedmmkt-no-feedback"],
    "fine_tune_snr_gamma=null": ["generator.params.fine_tune_snr_gamma=null"],
    "ceiling-generator": ["algorithm.name=fedmmkt-ceiling-generator"],
    "feddf-sharpened=0.5": ["algorithm.name=feddf-sharpened", "algorithm.params.sharpen=0.5"],
    "feddf-sharpened=0.25": ["algorithm.name=feddf-sharpened", "algorithm.params.sharpen=0.25"],
    "kd_weight=2": ["algorithm.params.kd_weight=2.0"],
    "kd_temperature=3": ["algorithm.params.kd_temperature=3.0", "aggregator.params.temperature=3.0"],
    "generator_lr=3e-4": ["generator.params.lr=0.0003"],
    "generator_lr=5e-4": ["generator.params.lr=0.0005"],
    "fine_tune_steps=75": ["generator.params.fine_tune_steps=75"],
    # after the latent fix (issue 22): the adapter reaches the clients' domain only by the last rounds, so a
    # faster adapter (a higher rate, or twice the steps per round) would give them in-domain images sooner
    "generator_lr=3e-3": ["generator.params.lr=0.003"],
    "fine_tune_steps=300": ["generator.params.fine_tune_steps=300"],
    # hard samples the federation reads as their prompt's class ranked first: the images whose agreed one-hot
    # target teaches the clients that do not yet see it (the adapter's images are agreed more often than the base's)
    "selection=agreed-disagreement": ["algorithm.params.transfer_selection=agreed-disagreement"],
    "frozen-generator,selection=agreed-disagreement": [
        "algorithm.name=fedmmkt-frozen-generator",
        "algorithm.params.transfer_selection=agreed-disagreement",
    ],
    # the adapter's images at a lower classifier-free guidance (the base's keep the recipe's 3.0): more diverse
    # images once fine-tuning has moved the adapter toward the clients' domain; both arms of the loop take it
    "adapter_guidance=1.5": ["generator.params.adapter_guidance_scale=1.5"],
    "frozen-generator,adapter_guidance=1.5": [
        "algorithm.name=fedmmkt-frozen-generator",
        "generator.params.adapter_guidance_scale=1.5",
    ],
    # every image (the base's too) at the lower guidance: what the diversity gives both arms
    "guidance=1.5": ["generator.params.guidance_scale=1.5"],
    "frozen-generator,guidance=1.5": ["algorithm.name=fedmmkt-frozen-generator", "generator.params.guidance_scale=1.5"],
    # the clients label the round's own set first and distil on it in the same round: each generator update
    # reaches their training a round sooner (in 5 rounds, four updates instead of three)
    "distill_on=this-round": ["algorithm.params.distill_on=this-round"],
    "frozen-generator,distill_on=this-round": [
        "algorithm.name=fedmmkt-frozen-generator",
        "algorithm.params.distill_on=this-round",
    ],
    # at guidance 1.5 the adapter's images teach (the loop's first interval above zero): a larger share of them
    "base_fraction=0.25": ["algorithm.params.base_fraction=0.25"],
    # no classifier-free guidance at all (the recipe draws at 1.5): the most diverse images, and one UNet pass per
    # denoising step instead of two, so synthesis and the generator's evaluation cost half (issue 25)
    "guidance=1.0": ["generator.params.guidance_scale=1.0"],
    "frozen-generator,guidance=1.0": ["algorithm.name=fedmmkt-frozen-generator", "generator.params.guidance_scale=1.0"],
    # inversion feedback: the clients also return how their own models would change each image (their class, their
    # private data's BatchNorm statistics), and the adapter is fine-tuned on the changed base images
    **{
        f"inversion={size}": ["algorithm.params.inversion_steps=5", f"algorithm.params.inversion_step_size={size}"]
        for size in (0.1, 0.3, 0.6)
    },
    # ... and on its own images changed too, so the changes accumulate round after round (DeepInversion through
    # the generator); without the changes, training on its own images made the adapter drift. 1.0: a larger
    # change, for the typeset recipe, whose ceiling leaves 12 points of room
    **{
        f"inversion={size},fine_tune_on=all": [
            "algorithm.params.inversion_steps=5",
            f"algorithm.params.inversion_step_size={size}",
            "algorithm.params.fine_tune_on=all",
        ]
        for size in (0.6, 1.0)
    },
    # class-mean feedback: the clients also return each class's mean private image (classes with >= 20 images), and
    # the adapter is fine-tuned on the base's images moved towards the federation's class means (by λ of the gap)
    **{f"class_means={strength}": [f"algorithm.params.class_mean_shift={strength}"] for strength in (0.5, 1.0)},
    # the typeset adapter learns to draw what the clients already recognise surely (their alignment on its images
    # ~0.98 by round 5, against ~0.8 on the pooled-real ceiling's): weight its weighted denoising by 1 - a_j
    # instead, so it learns most from the base's images the clients recognise least surely (hard positives),
    # the typeset recipe's ensemble-ce kept
    "weighting=uncertain,ensemble-ce=0.1": [
        'alignment_losses=[{"name": "weighted-denoising", "params": {"threshold": 0.5, "weighting": "uncertain"}}, '
        '{"name": "ensemble-ce", "weight": 0.1}]'
    ],
    # the demo recipe's whole loop (its transfer policy and its guidance), tried on a recipe that predates it
    # (Fashion-MNIST), beside the frozen base under the same selection and guidance: the loop's control
    "demo-loop": ["algorithm.params.base_fraction=0.5", "algorithm.params.fine_tune_on=base", *DEMO_SELECTION],
    "frozen-generator,demo-loop": ["algorithm.name=fedmmkt-frozen-generator", *DEMO_SELECTION],
    "fine_tune_snr_gamma=5": ["generator.params.fine_tune_snr_gamma=5.0"],
    "lora_rank=4": ["generator.params.lora.rank=4", "generator.params.lora.alpha=4.0"],
    "alignment_threshold=0.7": ['alignment_losses=[{"name": "weighted-denoising", "params": {"threshold": 0.7}}]'],
    # at α = 0.1 a client holds 4 to 200 private images, and an epoch was one pass over them: the clients that
    # need the synthetic set most (least data, fewest classes) distilled on it least. epoch_steps=longer makes
    # an epoch one pass over the longer of the two sets, for every client (CLIENT_PARAMS)
    **{
        f"{arm}epoch_steps=longer": source
        for arm, source in (
            ("", []),
            ("frozen-generator,", ["algorithm.name=fedmmkt-frozen-generator"]),
            ("ceiling-generator,", ["algorithm.name=fedmmkt-ceiling-generator"]),
            ("class_means=1.0,", ["algorithm.params.class_mean_shift=1.0"]),
            # under longer epochs at α = 0.1 the adapter's CAS is still rising at round 6 (0.53 against the
            # ceiling's 0.69), and it supplies half the candidates where the ceiling supplies all of them
            (
                "class_means=1.0,fine_tune_steps=300,",
                ["algorithm.params.class_mean_shift=1.0", "generator.params.fine_tune_steps=300"],
            ),
            (
                "class_means=1.0,base_fraction=0.25,",
                ["algorithm.params.class_mean_shift=1.0", "algorithm.params.base_fraction=0.25"],
            ),
            # the adapter learns only from round 3 or 4: its pool is the images the clients recognise (a_j >= 0.5),
            # which untrained clients do not; the class means need no trained client, so keep every base image
            (
                "class_means=1.0,alignment_threshold=0,",
                [
                    "algorithm.params.class_mean_shift=1.0",
                    'alignment_losses=[{"name": "weighted-denoising", "params": {"threshold": 0.0}}]',
                ],
            ),
            # ... which made it learn the base's mistakes: every base image (moved to the class means) in round 1
            # only, the clients' filter from round 2
            ("class_means=1.0,feedback_warmup=1,", WARMUP_CLASS_MEANS),
            # a perfect adapter under the recipe's mix: the ceiling draws only the adapter's half of the candidates
            (
                "ceiling-generator,ceiling_images=adapter-share,",
                ["algorithm.name=fedmmkt-ceiling-generator", "algorithm.params.ceiling_images=adapter-share"],
            ),
        )
    },
    "class_means=1.0,feedback_warmup=1": WARMUP_CLASS_MEANS,
}
# variants that also change every client group's parameters (merged into each group of the client set)
CLIENT_PARAMS: dict[str, dict[str, Any]] = {v: {"epoch_steps": "longer"} for v in VARIANTS if "epoch_steps=longer" in v}
BY_ROUND = ["client_accuracy_mean", "generator_cas", "generator_fid"]
METRICS = [
    "client_accuracy_mean",
    "client_accuracy_min",
    "generator_cas",
    "generator_cas_initial",
    "generator_fid",
    "generator_fid_initial",
]


def baseline(recipe_path: Path) -> dict[str, Any]:
    """The recipe's own FedMMKT settings, which every variant changes one of: a run measured around other
    settings (an earlier default) is labelled with the difference and is not taken for the current one."""
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    return dict(recipe.get("algorithm", {}).get("params") or {})


def label(run: dict[str, Any], current: dict[str, Any] | None) -> str:
    """A run's variant, with the settings it was measured around where they differ from ``current``."""
    around = run.get("baseline")
    if current is None or around is None or around == current:
        return run["variant"]
    keys = sorted(set(around) | set(current))
    changed = ", ".join(f"{k}={around.get(k)}" for k in keys if around.get(k) != current.get(k))
    return f"{run['variant']} (around {changed})"


def run_variant(recipe_path: Path, client_set: str, alpha: float, seed: int, variant: str, rounds: int, out: Path):
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.rundir import RunDirectory
    from fedmmkt_core.server.runner import Runner

    overrides = overrides_for(client_set, alpha, seed, "fedmmkt", rounds, recipe_path)
    overrides += ["data.evaluate_on=validation", *VARIANTS[variant]]
    if variant in CLIENT_PARAMS:
        groups = [
            {**g, "params": {**g.get("params", {}), **CLIENT_PARAMS[variant]}}
            for g in clients_of(client_set, recipe_path)
        ]
        overrides.append(f"clients={json.dumps(groups)}")
    if variant.startswith("feddf"):  # FedDF takes FedMMKT's transfer-set settings, not its server-knowledge targets
        overrides += ["algorithm.params.client_targets=ensemble"]
    recipe = load_recipe(recipe_path, overrides)
    around = baseline(recipe_path)  # read with the recipe, not when the run ends (the file may change meanwhile)
    run_dir = out / f"{recipe_path.stem}-{client_set}-a{alpha}-s{seed}-{variant.replace('=', '_').replace(',', '_')}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    summary = Runner(recipe, run_dir).run()
    rows = RunDirectory(run_dir).read_metrics()
    return {
        "client_set": client_set, "alpha": alpha, "seed": seed, "variant": variant, "overrides": overrides,
        "baseline": around, "process_seconds": time.perf_counter() - start,
        **{k: summary[k] for k in METRICS if k in summary},
        # each round's figures, so a study can tell when a difference appears (and what fewer rounds would give)
        "by_round": {k: [row.get(k) for row in rows] for k in BY_ROUND if any(k in row for row in rows)},
    }  # fmt: skip


def summarize(runs: list[dict[str, Any]], current: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Mean ± spread per (client set, α, variant); ``current`` is the recipe's FedMMKT settings now."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["client_set"], run["alpha"], label(run, current)), []).append(run)
    order = {v: i for i, v in enumerate(VARIANTS)}

    def position(key: tuple) -> tuple:  # current settings first, then runs around earlier ones
        variant, _, around = key[2].partition(" (around ")
        return (*key[:2], around, order.get(variant, len(order)))

    table = []
    for (client_set, alpha, variant), members in sorted(groups.items(), key=lambda kv: position(kv[0])):
        row: dict[str, Any] = {"client_set": client_set, "alpha": alpha, "variant": variant,
                               "seeds": sorted(m["seed"] for m in members)}  # fmt: skip
        for key in METRICS:
            values = [m[key] for m in members if key in m]
            if values:
                row[key] = spread(values)
        table.append(row)
    return table


def paired_vs(
    runs: list[dict[str, Any]],
    reference: str,
    current: dict[str, Any] | None = None,
    pairs: list[list[str]] | None = None,
) -> list[dict]:
    """Every variant against ``reference`` on the seeds both ran (same cell), per metric: the mean per-seed
    difference with its 95 % t-interval; each ``[variant, other]`` of ``pairs`` the same way; and each
    variant's CAS and Fréchet change from its start."""
    from .common import paired_interval

    chosen = [r for r in runs if label(r, current) == r["variant"]]
    by = {(r["client_set"], r["alpha"], r["variant"], r["seed"]): r for r in chosen}
    out = []
    for client_set, alpha, variant in sorted({(r["client_set"], r["alpha"], r["variant"]) for r in chosen}):
        mine = {s: r for (c, a, v, s), r in by.items() if (c, a, v) == (client_set, alpha, variant)}
        comparisons = []
        others = [reference] if variant != reference else []
        others += [other for first, other in pairs or [] if first == variant and other not in others]
        comparisons += [(f"{metric}: {variant} - {other}", metric, other, metric) for other in others
                        for metric in ("client_accuracy_mean", "generator_cas", "generator_fid")]  # fmt: skip
        comparisons += [
            (f"{metric}: {variant} - its start", metric, variant, metric + "_initial")
            for metric in ("generator_cas", "generator_fid")
        ]
        for name, metric, other, other_metric in comparisons:
            seeds = sorted(
                s for s, r in mine.items() if metric in r and other_metric in by.get((client_set, alpha, other, s), {})
            )
            if seeds:
                differences = [mine[s][metric] - by[(client_set, alpha, other, s)][other_metric] for s in seeds]
                out.append({"client_set": client_set, "alpha": alpha, "comparison": name, "seeds": seeds,
                            **paired_interval(differences)})  # fmt: skip
    return out


def print_paired(paired: list[dict[str, Any]]) -> None:
    for row in paired:
        low = "-" if row["low"] is None else f"{row['low']:+.3f}"
        high = "-" if row["high"] is None else f"{row['high']:+.3f}"
        seeds = " ".join(f"{v:+.3f}" for v in row["per_seed"])
        print(f"{row['client_set']:14} {row['alpha']:>4} {row['comparison']:58} {row['mean']:+.3f} "
              f"[{low}, {high}]  seeds {row['seeds']}: {seeds}")  # fmt: skip


def print_table(table: list[dict[str, Any]]) -> None:
    def cell(row: dict, key: str) -> str:
        return f"{row[key]['mean']:.3f}±{row[key]['std']:.3f}" if key in row else "-"

    print(f"{'clients':14} {'α':>4} {'variant':26} {'val acc':>12} {'val min':>12} {'CAS':>12} {'seeds':>6}")
    for row in table:
        print(
            f"{row['client_set']:14} {row['alpha']:>4} {row['variant']:26} {cell(row, 'client_accuracy_mean'):>12} "
            f"{cell(row, 'client_accuracy_min'):>12} {cell(row, 'generator_cas'):>12} {len(row['seeds']):>6}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--client-sets", nargs="+", default=["heterogeneous"], choices=list(CLIENT_SETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ablations"))
    parser.add_argument("--results", type=Path, default=None, help="default: results/ablations-<recipe>.json")
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[], help="add these files' runs (same setting)")
    parser.add_argument("--reference", default="fedmmkt", help="the variant paired differences are taken against")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("VARIANT", "OTHER"),
                        help="also pair VARIANT against OTHER (repeatable): arms of one selection")  # fmt: skip
    parser.add_argument("--no-run", action="store_true", help="only merge and rewrite the results file")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    result_file = args.results or RESULTS / f"ablations-{args.recipe.stem}.json"
    setting = {"recipe": str(args.recipe), "rounds": args.rounds, "torch_threads": threads, "split": "validation"}
    previous = json.loads(result_file.read_text()) if result_file.exists() else {}
    runs: list[dict[str, Any]] = previous.get("runs", []) if previous.get("setting") == setting else []
    measured_at = earlier_commits(previous) if runs else set()
    for other in args.merge_from:  # runs another worker measured with the same setting
        data = json.loads(other.read_text())
        if data.get("setting") != setting:
            raise SystemExit(f"{other}: measured with {data.get('setting')}, not {setting}")
        measured_at |= earlier_commits(data)
        known = {(r["client_set"], r["alpha"], r["seed"], r["variant"], json.dumps(r.get("baseline"))) for r in runs}
        runs += [
            r
            for r in data["runs"]
            if (r["client_set"], r["alpha"], r["seed"], r["variant"], json.dumps(r.get("baseline"))) not in known
        ]
    current = baseline(args.recipe)
    done = {(r["client_set"], r["alpha"], r["seed"], r["variant"]) for r in runs if r.get("baseline") == current}
    cells = [(c, a, s, v) for c in args.client_sets for a in args.alphas for s in args.seeds for v in args.variants]
    todo = [cell for cell in cells if cell not in done and not args.no_run]
    command = f"python -m benchmarks ablations --recipe {args.recipe} --rounds {args.rounds}"

    def save() -> None:
        atomic_write_json(result_file, {"setting": setting, "command": command, "machine": merged_machine(measured_at),
                                        "runs": runs, "baseline": current, "table": summarize(runs, current),
                                        "reference": args.reference, "pairs": args.pair,
                                        "paired": paired_vs(runs, args.reference, current, args.pair)})  # fmt: skip

    print(f"{len(cells)} cells, {len(todo)} to run", flush=True)
    for index, (client_set, alpha, seed, variant) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {client_set} α={alpha} seed={seed} {variant} ...", flush=True)
        result = run_variant(args.recipe, client_set, alpha, seed, variant, args.rounds, args.out)
        print(f"    val acc {result['client_accuracy_mean']:.3f}  CAS {result.get('generator_cas', '-')}"
              f"  {result['process_seconds']:.0f} s", flush=True)  # fmt: skip
        runs.append(result)
        if measured_at:
            measured_at.add(machine()["commit"])
        save()
    save()
    print_table(summarize(runs, current))
    print_paired(paired_vs(runs, args.reference, current, args.pair))
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()
