"""``fedmmkt``: run, validate, list plugins, print the recipe schema.

User errors (bad recipe, unknown plugin, missing file) exit with status 2 and a message, never a
traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="fedmmkt",
    help="Federated Multi-modal Knowledge Transfer: co-train a server text-to-image model and client task models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a recipe key, e.g. --set federation.rounds=3 (repeatable)"),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False) -> None:
    _state["debug"] = debug
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """fedmmkt's own warnings (a broken plugin package) as one ``warning:`` line, no source location."""
    if category.__name__ in ("PluginLoadWarning", "CacheWarning"):  # a broken plugin; a cache entry rebuilt
        err.print(f"[bold yellow]warning:[/bold yellow] {_escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, *args, **kwargs)


def _fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` (user text in it is escaped, never read as rich markup) and exit."""
    err.print(f"[bold red]error:[/bold red] {_escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _guard(func, *args: Any, doing: str = "", **kwargs: Any) -> Any:
    """Run ``func``; user errors and OS errors (naming the path and ``doing``, the operation) become one
    line and exit 2, run failures exit 1."""
    from fedmmkt_core.errors import UserError
    from fedmmkt_core.server.runner import RunFailed

    try:
        return func(*args, **kwargs)
    except typer.Exit:
        raise
    except UserError as exc:
        if _state["debug"]:
            raise
        _fail(str(exc), 2)
    except RunFailed as exc:
        if _state["debug"]:
            raise
        _fail(f"run failed: {exc}", 1)
    except OSError as exc:
        if _state["debug"]:
            raise
        _fail(_os_error(exc, doing), 2)
    except KeyboardInterrupt:
        _fail("interrupted; continue with --resume", 130)


def _os_error(exc: OSError, doing: str) -> str:
    """``DOING failed: STRERROR: PATH`` for an OSError (disk full, read-only, not a directory, ...)."""
    reason = exc.strerror or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = f": {' -> '.join(paths)}" if paths else ""
    return f"{doing + ' failed: ' if doing else ''}{reason}{where}"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _load(recipe: Path, overrides: list[str] | None):
    from fedmmkt_core.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe: exit 0 when valid, 2 with every error otherwise."""
    loaded = _guard(_load, recipe, set_)
    out.print(
        f"[green]ok[/green]: {_escape(str(recipe))} is valid ({loaded.num_clients} clients, "
        f"{loaded.federation.rounds} rounds)"
    )


@app.command()
def run(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="recipe YAML file (with --resume it may be left out)", show_default=False),
    ] = None,
    set_: SetOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="run directory (default runs/NAME-TIME)")] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="RUN_DIR", help="continue this run after its last completed round"),
    ] = None,
) -> None:
    """Run a recipe: rounds with progress bars, results in the run directory."""
    from fedmmkt_core.server.runner import Runner, default_run_dir

    if resume is not None:
        if out_dir is not None and out_dir.resolve() != resume.resolve():
            _fail(f"--out {out_dir} and --resume {resume} name different run directories")
        out_dir = resume
        if recipe is None:
            recipe = resume / "recipe.resolved.yaml"
            if not recipe.is_file():
                _fail(f"cannot resume: {resume} is not a run directory (no recipe.resolved.yaml)")
    elif recipe is None:
        _fail("give a RECIPE to run, or --resume RUN_DIR to continue a run")
    assert recipe is not None
    loaded = _guard(_load, recipe, set_)
    target = out_dir or default_run_dir(loaded)
    _check_cache_folder()
    if resume is None:
        _guard(_check_output_folder, target, "run directory --out" if out_dir is not None else "run directory")
    with _Progress() as progress:
        runner = Runner(loaded, target, resume=resume is not None, events=progress.event)
        summary = _guard(runner.run, doing=f"the run into {target}")
    table = Table(title=_escape(f"summary ({target})"), show_header=False)
    for key, value in summary.items():
        table.add_row(key, _fmt(value))
    out.print(table)


@app.command()
def partition(
    recipe: RecipeArg,
    out_dir: Annotated[Path, typer.Argument(help="new folder: one client_K folder per client", show_default=False)],
    set_: SetOpt = None,
) -> None:
    """Write each client's training share to OUT/client_K, to hand each site its own data.

    Exactly the share the recipe's partitioner cuts for client K (same images, labels, order), plus the
    split the clients are evaluated on (data.evaluate_on) as evaluation.safetensors, the same in every
    folder. A Flower SuperNode started with --node-config "data-root=OUT/client_K" trains and evaluates
    on that folder alone and never loads the dataset (see docs/flower.md). OUT/server holds the server's
    splits (evaluation, oracle, public): with data.server_folder=OUT/server the server never loads the
    dataset either."""
    from fedmmkt_core.client import write_partition
    from fedmmkt_core.loading import cut_server_data
    from fedmmkt_core.server_folder import write_server_folder

    loaded = _guard(_load, recipe, set_)
    _guard(_check_output_folder, out_dir, "partition folder")
    folders = _guard(write_partition, loaded, out_dir, doing=f"writing the partition into {out_dir}")
    source = {"recipe": loaded.name, "seed": loaded.seed, "dataset": loaded.data.dataset.name}
    server = _guard(
        lambda: write_server_folder(out_dir / "server", cut_server_data(loaded), loaded.data.evaluate_on, source),
        doing=f"writing the server's folder into {out_dir / 'server'}",
    )
    for folder in folders:
        out.print(_escape(str(folder)))
    out.print(_escape(str(server)))
    out.print(
        f"[green]ok[/green]: {len(folders)} client folders and the server's folder in {_escape(str(out_dir))} "
        f"(the server reads its own with --set data.server_folder={_escape(str(server))})"
    )


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List every registered implementation: kind, name, package, version."""
    from fedmmkt_core.plugins import get_registry

    registry = _guard(get_registry)
    rows = [entry.as_dict() for entry in registry]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    # Names are what a recipe needs, so they are never cut; the class column only fits a wide terminal
    # (it is always in --json), and the other columns fold.
    wide = out.width >= 120
    table = Table(title="fedmmkt plugins")
    table.add_column("kind", overflow="fold")
    table.add_column("name", no_wrap=True, min_width=max((len(r["name"]) for r in rows), default=4))
    table.add_column("package", overflow="fold")
    table.add_column("version", overflow="fold")
    if wide:
        table.add_column("class", overflow="fold")
    for row in rows:
        cells = [row["kind"], row["name"], row["package"], row["version"]] + ([row["class"]] if wide else [])
        table.add_row(*cells)
    out.print(table)
    broken = getattr(registry, "broken", {})
    for package in broken:
        out.print(f"[yellow]not loaded[/yellow]: {_escape(package)} (see the warning above)")
    for package in getattr(registry, "blocked", {}):  # a misspelt hook: recipes that use it are refused
        out.print(f"[yellow]blocked[/yellow]: {_escape(package)} (see the warning above)")


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (with every registered plugin's parameters)."""
    from fedmmkt_core.plugins import get_registry
    from fedmmkt_core.recipe import recipe_json_schema

    sys.stdout.write(json.dumps(_guard(recipe_json_schema, _guard(get_registry)), indent=2) + "\n")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory", show_default=False)],
    plot: Annotated[bool, typer.Option(help="write curves.png into the run directory")] = True,
    all_: Annotated[bool, typer.Option("--all", help="a column per numeric metric in the per-round table")] = False,
) -> None:
    """Print a run's summary and per-round table (the last round's other numeric metrics below it, or
    with --all as columns); write its curves."""
    from fedmmkt_core.reporting import load_run, numeric_columns, other_last_round_metrics, plot_curves

    summary, rows = _guard(load_run, run_dir, doing=f"reading the run {run_dir}")
    table = Table(title=_escape(f"summary ({run_dir})"), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in summary.items():
        table.add_row(_escape(key), _fmt(value))
    out.print(table)
    columns = [c for c in _ROUND_COLUMNS if any(c in r for r in rows)]
    if all_:
        columns += [c for c in numeric_columns(rows) if c not in columns]
    rounds = Table(title="rounds")
    for column in columns:  # long metric names fold onto several lines instead of being cut
        rounds.add_column(_escape(column), justify="right", overflow="fold")
    for row in rows:
        rounds.add_row(*(_fmt(row.get(c, "")) for c in columns))
    out.print(rounds)
    others = other_last_round_metrics(rows, columns)
    if others:  # a plugin's own metrics: visible without --all
        last = Table(title=f"round {rows[-1]['round']}: other metrics", caption="--all: every round", show_header=False)
        last.add_column(no_wrap=True)
        last.add_column(justify="right")
        for key, value in others.items():
            last.add_row(_escape(key), _fmt(value))
        out.print(last)
    if plot and rows:
        from fedmmkt_core.errors import UserError

        try:  # the report is printed: a run directory that cannot be written only loses its curves
            written = plot_curves({str(run_dir): rows}, run_dir / "curves.png")
        except (UserError, OSError) as exc:
            reason = str(exc) if isinstance(exc, UserError) else _os_error(exc, "writing the curves")
            err.print(
                f"[yellow]warning:[/yellow] curves not written: {_escape(reason)}", highlight=False, soft_wrap=True
            )
        else:
            if written:
                out.print(f"curves: {_escape(str(written))}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="two or more run directories", show_default=False)],
    plot_path: Annotated[Path, typer.Option("--plot", help="where to write the comparison plot")] = Path(
        "comparison.png"
    ),
) -> None:
    """Side-by-side summary of several runs, and a comparison plot."""
    from fedmmkt_core.reporting import check_plot_path, load_run, plot_curves

    _guard(check_plot_path, plot_path)
    loaded = {str(d): _guard(load_run, d, doing=f"reading the run {d}") for d in run_dirs}
    keys: list[str] = []
    for summary, _rows in loaded.values():
        keys += [k for k in summary if k not in keys]
    table = Table(title="comparison")
    table.add_column("metric")
    for name in loaded:
        table.add_column(_escape(name), justify="right")
    for key in keys:
        table.add_row(_escape(key), *(_fmt(summary.get(key, "")) for summary, _ in loaded.values()))
    out.print(table)
    written = _guard(plot_curves, {name: rows for name, (_, rows) in loaded.items()}, plot_path, doing="the plot")
    if written:
        out.print(f"plot: {_escape(str(written))}")


_ROUND_COLUMNS = (
    "round",
    "client_accuracy_mean",
    "client_accuracy_min",
    "generator_cas",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "seconds_round",
)


def _fmt(value: Any) -> str:
    """A value as a table cell: floats to 4 digits, user text escaped (never read as rich markup)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return _escape(text if len(text) <= 1000 else text[:1000] + "...")


def _check_cache_folder() -> None:
    """Refuse $FEDMMKT_CACHE (or the default cache folder) when it cannot be a writable folder, before a
    run spends minutes pre-training a generator it could not cache."""
    import os

    from fedmmkt_core.cache import cache_dir

    folder = cache_dir()
    what = "the cache folder (FEDMMKT_CACHE)" if os.environ.get("FEDMMKT_CACHE") else "the cache folder"
    _guard(_check_output_folder, folder, what)


def _check_output_folder(path: Path, what: str) -> None:
    from fedmmkt_core.paths import check_output_folder

    check_output_folder(path, what, probe=True)


class _Progress:
    """Progress bars for rounds and phases, fed by the runner's events."""

    def __enter__(self) -> _Progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=False,
            disable=not err.is_terminal,
        )
        self.progress.__enter__()
        self.round_task = None
        self.phase_tasks: dict[str, Any] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def event(self, event: str, **data: Any) -> None:
        p = self.progress
        if event == "run_start":
            self.round_task = p.add_task("rounds", total=data["rounds"], completed=data["completed"])
        elif event == "round_end" and self.round_task is not None:
            p.update(self.round_task, completed=data["round"])
            for task in self.phase_tasks.values():
                p.remove_task(task)
            self.phase_tasks.clear()
        elif event == "phase_start":
            task = self.phase_tasks.get(data["name"])
            if task is None:
                self.phase_tasks[data["name"]] = p.add_task(f"  {data['name']}", total=data.get("total"))
            else:
                p.reset(task, total=data.get("total"))
        elif event == "phase_advance" and data["name"] in self.phase_tasks:
            p.advance(self.phase_tasks[data["name"]], data.get("advance", 1))
        elif event == "logger_failure":
            err.print(
                f"[yellow]warning:[/yellow] logger '{data['logger']}' ({data['path']}) failed in {data['method']} "
                f"and is switched off; the run goes on: {_escape(data['reason'])}"
            )
        elif event == "failure":
            err.print(f"[yellow]client {data['client']} failed in {data['phase']}[/yellow]: {_escape(data['reason'])}")


federation_app = typer.Typer(
    help="A local Flower federation (SuperLink + SuperNodes on 127.0.0.1) for the flower backend."
)
app.add_typer(federation_app, name="federation")


MAX_NODES = 1000  # SuperNode processes on one machine


@federation_app.command("up")
def federation_up(
    nodes: Annotated[
        int | None,
        typer.Option("--nodes", "-n", help="SuperNodes to start (default: the recipe's clients)"),
    ] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="size the federation for this recipe")] = None,
    port: Annotated[int, typer.Option("--port", help="SuperLink HTTP port on 127.0.0.1 (0: any free)")] = 8000,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="logs and FLWR_HOME folders (default: a temp dir)")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="a folder written by `fedmmkt partition`: node K trains on its client_K"),
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="HTTPS with a CA and certificate written to WORKDIR/credentials")
    ] = False,
    auth: Annotated[
        bool,
        typer.Option(
            "--auth", help="admit only SuperNodes whose key was registered; bind each client id to its node's key"
        ),
    ] = False,
) -> None:
    """Start a SuperLink and one SuperNode per client on 127.0.0.1; stop them all on Ctrl-C.

    Node k holds partition-id k (with --data, node k's node config also names data-root=DATA/client_k).
    Then run a recipe on it with the `--set 'backend=...'` line it prints. With --tls the SuperLink serves
    HTTPS (a CA made for this federation); with --auth every node authenticates with its own key pair,
    registered before it starts, and the printed backend binds each client id to its node."""
    import signal
    import tempfile
    import time

    from fedmmkt_plugins.backends.flower import LocalFederation

    if nodes is not None and not 1 <= nodes <= MAX_NODES:
        _fail(f"--nodes {nodes}: a local federation runs 1 to {MAX_NODES} SuperNodes")
    if nodes is None:
        if recipe is None and data is None:
            _fail("give --nodes N, --recipe R or --data DATA")
        if recipe is not None:
            nodes = _guard(_load, recipe, []).num_clients
        else:
            assert data is not None
            nodes = len([p for p in data.glob("client_*") if p.is_dir()])
            if nodes == 0:
                _fail(f"{data} holds no client_K folders: write them with `fedmmkt partition RECIPE {data}`")
        if nodes > MAX_NODES:
            _fail(f"the federation would need {nodes} SuperNodes; a local federation runs at most {MAX_NODES}")
    if workdir is not None:
        _guard(_check_output_folder, workdir, "--workdir")
    folder = workdir or Path(tempfile.mkdtemp(prefix="fedmmkt-federation-"))
    federation = _guard(
        LocalFederation,
        nodes,
        folder,
        port=port or None,
        data=data,
        tls=tls,
        authenticate_nodes=auth,
        doing="starting the federation",
    )

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the federation as Ctrl-C does
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    _guard(federation.start, doing=f"starting the federation in {folder}")
    try:
        for name, proc in federation.processes.items():
            out.print(f"{name}: pid {proc.pid} (log {folder / (name + '.log')})")
        transport = "TLS" if tls else "insecure, loopback only"
        if auth:
            transport += f", {nodes} authenticated SuperNodes (client -> node id in {folder / 'node_ids.json'})"
        out.print(f"SuperLink at [bold]{federation.address}[/bold] ({transport}); Ctrl-C stops every process")
        backend = json.dumps({"name": "flower", "params": federation.backend_params()})
        out.print(f"run a recipe: fedmmkt run R --set 'backend={backend}'", soft_wrap=True, highlight=False)
        while all(proc.poll() is None for proc in federation.processes.values()):
            time.sleep(1.0)
        _fail("a federation process exited; see the logs in " + str(folder), 1)
    except KeyboardInterrupt:
        out.print("stopping")
    finally:
        federation.stop()


data_app = typer.Typer(help="Fetch and verify the files of datasets recipes read (fashion-mnist), checksums pinned.")
app.add_typer(data_app, name="data")
DatasetArg = Annotated[str, typer.Argument(help="dataset: fashion-mnist", show_default=False)]


@data_app.command("fetch")
def data_fetch(
    dataset: DatasetArg,
    folder: Annotated[Path, typer.Argument(help="folder the files are written to", show_default=False)],
    from_: Annotated[
        Path | None, typer.Option("--from", help="copy files downloaded by hand from this folder instead of apt")
    ] = None,
) -> None:
    """Bring a dataset's files (apt-get download + dpkg -x, or --from a folder), check their sha256, write them."""
    from fedmmkt_plugins.datasets.fetch import fetch, render

    out.print(render(_guard(fetch, dataset, folder, from_, say=lambda line: err.print(line, highlight=False))))


@data_app.command("verify")
def data_verify(
    dataset: DatasetArg, folder: Annotated[Path, typer.Argument(help="folder holding the files", show_default=False)]
) -> None:
    """Check a dataset's files in FOLDER against the pinned sha256 (exit 2 naming a file that differs)."""
    from fedmmkt_plugins.datasets.fetch import render, verify

    out.print(render(_guard(verify, dataset, folder), verb="verified"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
