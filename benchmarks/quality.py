"""Quality matrix: every algorithm × client set × Dirichlet α × seed on digits.

    python -m benchmarks quality [--rounds 5] [--seeds 0 1 2] [--alphas 0.1 0.5] [--client-sets ...]

One run per cell, through the toolkit's ``Runner`` on ``examples/digits.yaml``. Every finished run is
written to ``benchmarks/results/quality-digits.json`` at once, so a killed benchmark continues where it
stopped when started again with the same settings (``--fresh`` starts over). The table gives mean ± std
over seeds of the last round's client mean accuracy, client min accuracy and generator CAS.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, atomic_write_json, earlier_commits, machine, merged_machine, set_threads, spread

RECIPE = Path("examples/digits.yaml")
# Which clients a cell runs. The digits recipes' own clients are 3 ResNets + 3 ViTs.
CLIENT_SETS = {
    "heterogeneous": "the recipe's own clients",
    "homogeneous": "as many clients, every one the recipe's first ResNet (FedAvg needs one architecture)",
}
ALGORITHMS = [
    "local", "fedavg", "feddf", "feddf-sharpened", "fedmmkt-frozen-generator", "fedmmkt-no-feedback",
    "fedmmkt-ceiling-generator", "fedmmkt", "centralized",
]  # fmt: skip
GENERATOR_ALGORITHMS = {
    "feddf", "feddf-sharpened", "fedmmkt-frozen-generator", "fedmmkt-no-feedback", "fedmmkt-ceiling-generator",
    "fedmmkt", "centralized",
}  # fmt: skip
METRICS = [
    "client_accuracy_mean", "client_accuracy_min", "generator_cas", "generator_cas_initial", "generator_fid",
    "generator_fid_initial",
]  # fmt: skip
# The paired comparisons a reviewer asks for: (name, metric, algorithm, its reference, reference's metric).
PAIRED = [
    ("clients: FedMMKT - frozen generator (the loop)", "client_accuracy_mean", "fedmmkt", "fedmmkt-frozen-generator"),
    ("clients: FedMMKT - sharpened FedDF", "client_accuracy_mean", "fedmmkt", "feddf-sharpened"),
    ("clients: FedMMKT - FedDF", "client_accuracy_mean", "fedmmkt", "feddf"),
    ("clients: FedMMKT - local training", "client_accuracy_mean", "fedmmkt", "local"),
    ("clients: FedMMKT - centralized (the gap to pooled data)", "client_accuracy_mean", "fedmmkt", "centralized"),
    ("clients: ceiling generator - frozen generator", "client_accuracy_mean", "fedmmkt-ceiling-generator",
     "fedmmkt-frozen-generator"),
    ("CAS: FedMMKT - step-matched control", "generator_cas", "fedmmkt", "fedmmkt-no-feedback"),
    ("CAS: FedMMKT - its start", "generator_cas", "fedmmkt", "fedmmkt"),
    ("CAS: pooled-real ceiling - its start", "generator_cas", "centralized", "centralized"),
    ("Frechet: FedMMKT - its start", "generator_fid", "fedmmkt", "fedmmkt"),
]  # fmt: skip
BYTES = ["bytes_up_per_client_round", "bytes_down_per_client_round"]
RESULT_FILE = RESULTS / "quality-digits.json"
OTHER_GENERATOR = "(another generator training)"


def valid(algorithm: str, client_set: str) -> bool:
    """FedAvg averages weights, so it needs one architecture for every client."""
    return algorithm != "fedavg" or client_set == "homogeneous"


FINE_TUNE_FIELDS = (
    "lr", "batch_size", "max_grad_norm", "fine_tune_steps", "fine_tune_epochs", "fine_tune_snr_gamma",
    "fine_tune_latents", "lora",
)  # fmt: skip


# how the generator draws its images (every generator algorithm's transfer set and CAS); runs recorded before
# these were are the quality recipes' values then (all three: 10 steps at guidance 3.0, one guidance for both)
SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "adapter_guidance_scale")
EARLIER_SAMPLING = {"num_inference_steps": 10, "guidance_scale": 3.0, "adapter_guidance_scale": None}


# FedMMKT's settings of who draws the transfer set, which of it the clients distil on and what the adapter trains on
TRANSFER_FIELDS = ("base_fraction", "transfer_policy", "transfer_candidates", "transfer_selection", "fine_tune_on")
# what FedMMKT's adapter is fine-tuned on beyond the clients' labels (the frozen arm, the control and the ceiling
# never ask for the clients' inversion deltas or class means, so these never change their figures)
FEEDBACK_FIELDS = ("inversion_steps", "inversion_step_size", "class_mean_shift", "class_mean_min_count")
FEDMMKT_FIELDS = (*TRANSFER_FIELDS, *FEEDBACK_FIELDS)  # what a FedMMKT run and the recipe record
# FedDF's baselines distil on every image they draw (textbook), so they never take FedMMKT's hard-sample selection
SELECTION_FIELDS = ("transfer_candidates", "transfer_selection")
# whose transfer set which of those fields set: the ceiling generator draws every image itself, so only the
# selection (its client side is FedMMKT's)
TRANSFER_ALGORITHMS = {
    "fedmmkt": FEDMMKT_FIELDS,
    "fedmmkt-no-feedback": TRANSFER_FIELDS,
    "fedmmkt-frozen-generator": TRANSFER_FIELDS,
    "fedmmkt-ceiling-generator": SELECTION_FIELDS,
}


# the algorithms whose generator is fine-tuned with the recipe's alignment losses (the frozen generator and the
# FedDF baselines never fine-tune it, so those losses cannot change their figures)
ALIGNMENT_ALGORITHMS = {"fedmmkt", "fedmmkt-no-feedback", "fedmmkt-ceiling-generator", "centralized"}
# what every run measured before the losses were recorded fine-tuned with: every digits and Fashion recipe's
EARLIER_ALIGNMENT = [{"name": "weighted-denoising", "weight": 1.0, "params": {"threshold": 0.5}}]


def alignment_settings(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alignment-loss specs (``name``, ``weight``, ``params``) with each loss's defaults filled in."""
    from fedmmkt_core.plugins import get_registry

    registry = get_registry()
    filled = []
    for spec in specs:
        config = registry.get("alignment_loss", spec["name"]).cls.Config(**spec.get("params", {}))
        params = config.model_dump(mode="json")
        filled.append({"name": spec["name"], "weight": spec.get("weight", 1.0), "params": params})
    return filled


def generator_training(recipe_path: Path) -> dict[str, Any]:
    """How the recipe trains its generator, defaults filled in: ``pretrain`` (the base's pre-training),
    ``fine_tune`` (the LoRA fine-tuning settings), each ``None`` where the generator has none, and
    ``transfer`` (which generator draws the clients' transfer set: :data:`TRANSFER_FIELDS`). A run of a
    generator algorithm records them; runs measured under other settings are labelled in the table and are
    not reused when the benchmark resumes."""
    from fedmmkt_core.recipe import load_recipe

    # the generator's and algorithm's settings do not depend on the data, whose folder (e.g. Fashion-MNIST's
    # IDX files) need not exist where the docs are rendered: a stand-in dataset keeps validation from reading it
    recipe = load_recipe(recipe_path, ["data.dataset={name: digits}"])
    transfer = transfer_settings(recipe.algorithm.params, FEDMMKT_FIELDS)
    alignment = alignment_settings([spec.model_dump(mode="json") for spec in recipe.alignment_losses])
    if recipe.generator is None:
        return {"pretrain": None, "fine_tune": None, "transfer": transfer, "alignment": alignment}
    dumped = recipe.build("generator", recipe.generator).config.model_dump(mode="json")
    fine_tune = {k: dumped[k] for k in FINE_TUNE_FIELDS if k in dumped} or None
    sampling = {k: dumped[k] for k in SAMPLING_FIELDS if k in dumped} or None
    return {
        "pretrain": dumped.get("pretrain"), "fine_tune": fine_tune, "sampling": sampling, "transfer": transfer,
        "alignment": alignment,
    }  # fmt: skip


def run_sampling(run: dict[str, Any]) -> dict[str, Any] | None:
    """How a generator algorithm's run drew its images: recorded, else :data:`EARLIER_SAMPLING`; None for
    algorithms without a generator."""
    if run["algorithm"] not in GENERATOR_ALGORITHMS:
        return None
    return run["sampling"] if "sampling" in run else EARLIER_SAMPLING


def run_alignment(run: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The alignment losses a run fine-tuned its generator with (recorded, else the earlier recipes'); None for
    algorithms that never fine-tune it."""
    if run["algorithm"] not in ALIGNMENT_ALGORITHMS:
        return None
    return run["alignment"] if "alignment" in run else earlier_alignment()


@functools.cache
def earlier_alignment() -> list[dict[str, Any]]:
    """:data:`EARLIER_ALIGNMENT` with its defaults filled in, built once (every unrecorded run reads it)."""
    return alignment_settings(EARLIER_ALIGNMENT)


def run_transfer(run: dict[str, Any]) -> dict[str, Any] | None:
    """The transfer-set settings a run used: recorded, else read from its ``algorithm=`` override (runs
    measured before they were recorded); None for algorithms whose transfer set they do not set."""
    if run["algorithm"] not in TRANSFER_ALGORITHMS:
        return None
    fields = TRANSFER_ALGORITHMS[run["algorithm"]]
    if "transfer" in run:  # runs recorded before a field existed ran its default
        return transfer_settings(run["transfer"], fields)
    spec = next((o.split("=", 1)[1] for o in run.get("overrides", []) if o.startswith("algorithm=")), None)
    return transfer_settings(json.loads(spec).get("params", {}) if spec else {}, fields)


def transfer_settings(params: dict[str, Any], fields: tuple[str, ...] = TRANSFER_FIELDS) -> dict[str, Any]:
    """``fields`` (:data:`TRANSFER_FIELDS`) of FedMMKT's parameters, its defaults filled in."""
    from fedmmkt_plugins.algorithms.fedmmkt import FedMMKTConfig

    defaults = FedMMKTConfig().model_dump()
    return {k: params.get(k, defaults[k]) for k in fields}


def label(run: dict[str, Any], current: dict[str, Any] | None) -> str:
    """A run's algorithm, marked when it trained the generator or drew its transfer set otherwise than
    ``current`` (from :func:`generator_training`)."""
    if run["algorithm"] in GENERATOR_ALGORITHMS and current is not None:
        own = ("transfer", "alignment", "sampling")
        differs = any(run.get(key, value) != value for key, value in current.items() if key not in own)
        if current.get("sampling") is not None:
            differs = differs or run_sampling(run) != current["sampling"]
        transfer = run_transfer(run)  # None where the algorithm's transfer set is not FedMMKT's
        if transfer is not None and "transfer" in current:
            differs = differs or transfer != transfer_settings(current["transfer"], tuple(transfer))
        alignment = run_alignment(run)  # None where the algorithm never fine-tunes the generator
        if alignment is not None and "alignment" in current:
            differs = differs or alignment != current["alignment"]
        if differs:
            return f"{run['algorithm']} {OTHER_GENERATOR}"
    return run["algorithm"]


def merge_key(run: dict[str, Any]) -> tuple:
    """A run's cell, generator training and transfer set: one run per key survives a merge of result files."""
    training = json.dumps(
        [run.get("pretrain"), run.get("fine_tune"), run_transfer(run), run_alignment(run), run_sampling(run)]
    )
    return run["client_set"], run["alpha"], run["seed"], run["algorithm"], training


def clients_of(client_set: str, recipe_path: Path = RECIPE) -> list[dict[str, Any]]:
    """The ``clients`` list of a cell: the recipe's own (heterogeneous), or as many copies of its first
    ResNet entry (homogeneous)."""
    from fedmmkt_core.recipe import load_recipe

    own = [
        {"name": group.name, "count": group.count, "params": dict(group.params)}
        for group in load_recipe(recipe_path).clients
    ]
    if client_set == "heterogeneous":
        return own
    resnets = [group for group in own if group["name"] == "resnet"]
    if not resnets:
        raise SystemExit(f"{recipe_path}: the homogeneous client set copies the recipe's resnet clients; it has none")
    return [{**resnets[0], "count": sum(group["count"] for group in own)}]


def overrides_for(
    client_set: str, alpha: float, seed: int, algorithm: str, rounds: int, recipe_path: Path = RECIPE
) -> list[str]:
    from fedmmkt_core.recipe import load_recipe

    params = dict(load_recipe(recipe_path).algorithm.params) if algorithm in GENERATOR_ALGORITHMS else {}
    if algorithm in ("feddf", "feddf-sharpened", "centralized"):  # same transfer set, none of FedMMKT's targets
        dropped = ("client_targets", "prompt_weight", *SELECTION_FIELDS)
        params = {k: v for k, v in params.items() if k not in dropped}
    return [
        f"seed={seed}",
        f"federation.rounds={rounds}",
        f"data.partitioner.params.alpha={alpha}",
        f"clients={json.dumps(clients_of(client_set, recipe_path))}",
        f"algorithm={json.dumps({'name': algorithm, 'params': params})}",
        "loggers=[]",
    ]


def run_cell(
    client_set: str, alpha: float, seed: int, algorithm: str, rounds: int, out: Path, recipe_path: Path = RECIPE
) -> dict[str, Any]:
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.rundir import RunDirectory
    from fedmmkt_core.server.runner import Runner

    overrides = overrides_for(client_set, alpha, seed, algorithm, rounds, recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    run_dir = out / f"{recipe_path.stem}-{client_set}-a{alpha}-s{seed}-{algorithm}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    summary = Runner(recipe, run_dir).run()
    rows = RunDirectory(run_dir).read_metrics()
    phases = sorted({k for row in rows for k in row if k.startswith("seconds_")})
    return {
        "client_set": client_set,
        "alpha": alpha,
        "seed": seed,
        "algorithm": algorithm,
        "overrides": overrides,
        **(generator_training(recipe_path) if algorithm in GENERATOR_ALGORITHMS else {}),
        "process_seconds": time.perf_counter() - start,
        **{k: summary[k] for k in (*METRICS, *BYTES) if k in summary},
        "accuracy_by_round": [row.get("client_accuracy_mean") for row in rows],
        "seconds_per_round": {p[len("seconds_") :]: [row.get(p, 0.0) for row in rows] for p in phases},
    }


def summarize(runs: list[dict[str, Any]], current: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (client set, α, algorithm): mean ± std over seeds of each metric. Runs of the generator
    algorithms measured under generator training other than ``current`` get rows of their own, after the rest."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        name = label(run, current)
        training = merge_key(run)[-1] if name != run["algorithm"] else ""  # earlier trainings are never pooled
        groups.setdefault((run["client_set"], run["alpha"], name, training), []).append(run)
    order = {a: i for i, a in enumerate(ALGORITHMS)}

    def position(key: tuple) -> tuple:
        algorithm, _, other = key[2].partition(" ")
        training = json.dumps(json.loads(key[3])[:3]) if key[3] else ""  # rows ordered as before losses were kept
        return (key[0], key[1], bool(other), training, order.get(algorithm, 99))

    table = []
    for (client_set, alpha, algorithm, _), members in sorted(groups.items(), key=lambda kv: position(kv[0])):
        row: dict[str, Any] = {"client_set": client_set, "alpha": alpha, "algorithm": algorithm,
                               "seeds": sorted(m["seed"] for m in members)}  # fmt: skip
        by_seed = sorted(members, key=lambda m: m["seed"])
        for key in (*METRICS, *BYTES, "process_seconds"):
            values = [m[key] for m in by_seed if key in m]
            if values:
                row[key] = spread(values)
                if len(values) == len(by_seed):
                    row[key]["per_seed"] = values  # aligned with row["seeds"]
        table.append(row)
    return table


def paired(runs: list[dict[str, Any]], current: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per (client set, α): each of :data:`PAIRED`'s comparisons on the seeds both sides ran (current
    generator training only), as the mean per-seed difference with its 95 % t-interval."""
    from .common import paired_interval

    chosen = [r for r in runs if label(r, current) == r["algorithm"]]
    by = {(r["client_set"], r["alpha"], r["algorithm"], r["seed"]): r for r in chosen}
    out = []
    for client_set, alpha in sorted({(r["client_set"], r["alpha"]) for r in chosen}):
        for name, metric, first, second in PAIRED:
            reference = metric + "_initial" if first == second else metric
            seeds = sorted(
                seed
                for (c, a, algorithm, seed), run in by.items()
                if (c, a, algorithm) == (client_set, alpha, first)
                and metric in run
                and reference in by.get((c, a, second, seed), {})
                and same_start(run, by[(c, a, second, seed)])
            )
            if seeds:
                differences = [
                    by[(client_set, alpha, first, s)][metric] - by[(client_set, alpha, second, s)][reference]
                    for s in seeds
                ]
                out.append({"client_set": client_set, "alpha": alpha, "comparison": name, "metric": metric,
                            "seeds": seeds, **paired_interval(differences)})  # fmt: skip
    return out


def same_start(run: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two runs of one seed started from the same pre-trained base and oracle, as far as their start
    CAS tells (runs without a generator pass): a pair measured against another cached base or oracle (say a
    cache rebuilt since) is not a paired comparison, so it is left out."""
    first, second = run.get("generator_cas_initial"), other.get("generator_cas_initial")
    return first is None or second is None or abs(first - second) < 1e-9


def print_table(table: list[dict[str, Any]]) -> None:
    def cell(row: dict, key: str) -> str:
        return f"{row[key]['mean']:.3f}±{row[key]['std']:.3f}" if key in row else "-"

    print(f"{'clients':14} {'α':>4} {'algorithm':26} {'acc mean':>12} {'acc min':>12} {'CAS':>12} {'seeds':>6}")
    for row in table:
        print(
            f"{row['client_set']:14} {row['alpha']:>4} {row['algorithm']:26} {cell(row, 'client_accuracy_mean'):>12} "
            f"{cell(row, 'client_accuracy_min'):>12} {cell(row, 'generator_cas'):>12} {len(row['seeds']):>6}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="results go to results/quality-<stem>.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--client-sets", nargs="+", default=list(CLIENT_SETS), choices=list(CLIENT_SETS))
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument(
        "--results", type=Path, default=None,
        help="results file (a second worker on other cells writes its own; merge with --merge-from)",
    )  # fmt: skip
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[], help="add these files' runs first")
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    parser.add_argument(
        "--no-run", action="store_true", help="only merge (--merge-from) and rewrite the results file; run no cell"
    )
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    setting = {"recipe": str(args.recipe), "rounds": args.rounds, "torch_threads": threads}
    result_file: Path = args.results or RESULTS / f"quality-{args.recipe.stem}.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() and not args.fresh else {}
    runs: list[dict[str, Any]] = previous.get("runs", []) if previous.get("setting") == setting else []
    measured_at = earlier_commits(previous) if runs else set()
    for other in args.merge_from:  # runs another worker measured with the same setting
        data = json.loads(other.read_text())
        if data.get("setting") != setting:
            raise SystemExit(f"{other}: measured with {data.get('setting')}, not {setting}")
        measured_at |= earlier_commits(data)
        known = {merge_key(r) for r in runs}
        runs += [r for r in data["runs"] if merge_key(r) not in known]
    current = generator_training(args.recipe)
    reusable = [r for r in runs if label(r, current) == r["algorithm"]]
    done = {(r["client_set"], r["alpha"], r["seed"], r["algorithm"]) for r in reusable}
    cells = [  # seed-major: a matrix cut short still has every cell for the first seeds
        (client_set, alpha, seed, algorithm)
        for seed in args.seeds
        for client_set in args.client_sets
        for alpha in args.alphas
        for algorithm in args.algorithms
        if valid(algorithm, client_set)
    ]
    command = "python -m benchmarks quality " + " ".join(
        [
            f"--recipe {args.recipe}",
            f"--rounds {args.rounds}",
            "--seeds",
            *map(str, args.seeds),
            "--alphas",
            *map(str, args.alphas),
        ]
        + (["--client-sets", *args.client_sets] if args.client_sets != list(CLIENT_SETS) else [])
        + (["--threads", str(args.threads)] if args.threads else [])
    )

    def save() -> None:
        atomic_write_json(result_file, {
            "setting": setting, "command": command, "machine": merged_machine(measured_at), "runs": runs,
            "table": [r for r in summarize(runs, current) if not r["algorithm"].endswith(OTHER_GENERATOR)],
            "archive": [r for r in summarize(runs, current) if r["algorithm"].endswith(OTHER_GENERATOR)],
            "paired": paired(runs, current),
        })  # fmt: skip

    todo = [c for c in cells if c not in done and not args.no_run]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already measured, {len(todo)} to run", flush=True)
    for index, (client_set, alpha, seed, algorithm) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {client_set} α={alpha} seed={seed} {algorithm} ...", flush=True)
        result = run_cell(client_set, alpha, seed, algorithm, args.rounds, args.out, args.recipe)
        print(
            f"    acc {result.get('client_accuracy_mean', float('nan')):.3f}  CAS {result.get('generator_cas', '-')}"
            f"  {result['process_seconds']:.0f} s",
            flush=True,
        )
        runs.append(result)
        if measured_at:
            measured_at.add(machine()["commit"])
        save()
    save()
    print_table(summarize(runs, current))
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()
