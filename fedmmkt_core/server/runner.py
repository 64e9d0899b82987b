"""The round loop: build a run from a validated recipe, run its rounds, write the run directory."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from hashlib import sha256 as _sha256
from pathlib import Path
from typing import Any

import numpy as np

from fedmmkt_core.allocator import keep_freed_memory
from fedmmkt_core.cache import cache_dir
from fedmmkt_core.errors import PluginOutputError, UserError
from fedmmkt_core.faults import crash_point
from fedmmkt_core.interfaces import Algorithm, Backend, Logger
from fedmmkt_core.loading import load_data, load_server_data
from fedmmkt_core.outputs import check_metrics
from fedmmkt_core.recipe import Recipe, dump_yaml
from fedmmkt_core.rundir import (
    LOCK_FILE,
    RUN_FILE,
    STATE_FILE,
    RunDirectory,
    RunLock,
    RunRecord,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json_file,
    refuse_foreign_folder,
    remove_new_paths,
    save_safetensors,
    sha256_file,
    snapshot,
    to_jsonable,
)
from fedmmkt_core.seeding import seed_everything
from fedmmkt_core.server.context import EventSink, RoundFailed, ServerContext
from fedmmkt_core.server.failures import crash_message, tracking_phases
from fedmmkt_core.server.progress import progress_events
from fedmmkt_core.server.summary import run_summary

log = logging.getLogger("fedmmkt")

__all__ = ["Runner", "RunFailed", "cache_dir", "load_data"]


class RunFailed(Exception):
    """The run could not go on (e.g. too few clients); the message says why."""


class PluginCrashed(RunFailed):
    """A plugin raised: names it, its package, the round and phase (traceback: log.txt, ``__cause__``)."""


def sha256(data: bytes) -> str:
    return _sha256(data).hexdigest()


class _LogBuffer(logging.Handler):
    """Holds log records in memory until a resume is committed (see ``Runner._commit``)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class Runner:
    """Runs a recipe into a run directory; ``resume=True`` continues after the last completed round."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        resume: bool = False,
        events: EventSink | None = None,
        backend: Backend | None = None,
    ):
        """``backend``: the backend instance to use instead of building the recipe's (e.g. one a Flower
        ServerApp has bound to its grid, whose ``launch`` then runs the round loop in this process)."""
        self.recipe = recipe
        self.run_dir = RunDirectory(out_dir)
        self.resume = resume
        self.events: EventSink = events or (lambda *args, **kwargs: None)
        self.backend = backend
        self._where, self._phase = "set-up", "set-up"  # what the run was doing, for a plugin's crash

    def _prepare_directory(self) -> int:
        """Create the run directory's files, or (resume) verify it; return the rounds already completed.

        A resume verifies everything and writes nothing: the stored recipe against the hash recorded
        when the run started and against this recipe, state.json against the hash in run.json, every
        checkpoint file against the hash recorded when it was written, metrics.jsonl against the
        checkpoint. What a resume changes (a stale metrics row, the log) waits for :meth:`_commit`."""
        resolved = dump_yaml(self.recipe.resolved())
        state_path = self.run_dir.checkpoint_dir / STATE_FILE
        if self.resume:
            completed, rows = self._verify_resume(resolved)
            kept = [row for row in rows if row["round"] <= completed]
            if len(kept) != len(rows):  # a round that finished writing metrics but not its checkpoint
                self._rows_to_keep = kept
            return completed
        if self.run_dir.metrics_path.exists() or state_path.exists() or self.run_dir.recipe_path.exists():
            raise UserError(
                f"{self.run_dir.root} already holds a run; pass --resume to continue it or --out for a new directory"
            )
        self.record = RunRecord(self.run_dir.root, sha256(resolved.encode("utf-8")))
        self.record.write()
        atomic_write_text(self.run_dir.recipe_path, resolved)
        return 0

    def _verify_resume(self, resolved: str) -> tuple[int, list[dict[str, Any]]]:
        """Check a run directory before resuming it; return (rounds completed, metrics rows). Reads only."""
        root = self.run_dir.root
        recipe_path = self.run_dir.recipe_path
        if not recipe_path.is_file():
            raise UserError(f"cannot resume: {root} is not a run directory (no recipe.resolved.yaml)")
        state_path = self.run_dir.checkpoint_dir / STATE_FILE
        self.record = RunRecord.verify(root, state_path)
        recorded = self.record.recipe_sha256
        if sha256(recipe_path.read_bytes()) != recorded:
            raise UserError(
                f"cannot resume {root}: {recipe_path} was changed after the run started (its sha256 differs "
                f"from the one in {RUN_FILE}); restore it or start a new run"
            )
        if recipe_path.read_bytes() != resolved.encode("utf-8"):
            raise UserError(
                f"cannot resume {root}: the recipe differs from the one it was started with "
                f"({recipe_path}); resume with the same recipe and --set options"
            )
        completed = 0
        if self.record.state_sha256 is not None:  # its hash was checked: the state this run wrote
            state = read_json_file(state_path, "cannot resume: checkpoint state")
            completed = self._check_state(state, state_path, recorded)
        rows = self.run_dir.read_metrics()
        done = [row.get("round") if isinstance(row, dict) else None for row in rows]
        if done[:completed] != list(range(1, completed + 1)) or any(
            not isinstance(r, int) or r <= completed for r in done[completed:]
        ):
            raise UserError(
                f"cannot resume {root}: {self.run_dir.metrics_path} does not hold rounds 1..{completed} "
                f"that {state_path} says were completed (rounds found: {done[:20]})"
            )
        return completed, rows

    def _check_state(self, state: Any, state_path: Path, recipe_sha256: str) -> int:
        """Validate state.json's fields and every checkpoint file it records; return rounds completed."""
        where = f"cannot resume {self.run_dir.root}: {state_path}"
        rounds = self.recipe.federation.rounds
        if not isinstance(state, dict):
            raise UserError(f"{where} is not a JSON object")
        completed = state.get("rounds_completed")
        if not isinstance(completed, int) or isinstance(completed, bool) or not 1 <= completed <= rounds:
            raise UserError(f"{where}: rounds_completed must be a whole number from 1 to {rounds}, got {completed!r}")
        files = state.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise UserError(f"{where} records no checkpoint hashes (files); it was not written by this fedmmkt")
        if state.get("recipe_sha256") != recipe_sha256:
            raise UserError(f"{where} belongs to another recipe than {self.run_dir.recipe_path}")
        if not isinstance(state.get("algorithm"), dict) or state.get("algorithm_arrays") not in files:
            raise UserError(f"{where}: 'algorithm' / 'algorithm_arrays' are missing or not recorded in files")
        directory = self.run_dir.checkpoint_dir
        for name, digest in sorted(files.items()):
            path = directory / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise UserError(f"{where}: checkpoint name {name!r} leaves the checkpoint folder")
            if not path.is_file():
                raise UserError(f"cannot resume {self.run_dir.root}: checkpoint {path} is missing")
            if sha256_file(path) != digest:
                raise UserError(
                    f"cannot resume {self.run_dir.root}: checkpoint {path} is damaged (its sha256 differs "
                    "from the one recorded when it was written)"
                )
        for name in (f"algorithm.r{completed}.safetensors", f"generator.r{completed}.safetensors"):
            if (directory / name).exists() and name not in files:
                raise UserError(f"{where}: checkpoint {directory / name} is not recorded in its files")
        loaded = set(self.run_dir.client_checkpoints(completed))
        recorded_clients = {name for name in files if name.startswith("clients/")}
        if loaded != recorded_clients:
            names = ", ".join(sorted(loaded ^ recorded_clients))
            raise UserError(
                f"cannot resume {self.run_dir.root}: client checkpoints differ from those recorded in "
                f"{state_path} ({names})"
            )
        return completed

    def run(self) -> dict[str, Any]:
        keep_freed_memory()
        backend = self.backend if self.backend is not None else self.recipe.build("backend", self.recipe.backend)
        assert isinstance(backend, Backend)
        if not self.resume:  # before a launcher writes into it
            refuse_foreign_folder(self.run_dir.root)
        summary = backend.launch(self)  # a backend that hosts the round loop elsewhere (Flower deployment)
        if summary is not None:
            return summary
        self.backend = backend  # the same instance runs the round loop
        root = self.run_dir.root
        if self.resume and not root.is_dir():
            raise UserError(f"cannot resume: {root} is not a run directory")
        existed = root.exists()
        if not existed:
            try:
                root.mkdir(parents=True)
            except OSError as exc:
                raise UserError(f"cannot create the run directory {root}: {exc.strerror or exc}") from None
        elif not root.is_dir():
            raise UserError(f"the run directory {root} exists and is not a folder")
        elif not self.resume:
            refuse_foreign_folder(root)  # again: the folder may have changed since
        found = snapshot(root) if existed and not self.resume else set()
        lock = RunLock.acquire(root)
        self._rows_to_keep: list[dict[str, Any]] | None = None
        try:
            completed = self._prepare_directory()
        except BaseException:
            lock.release(restore=True)  # refused before changing anything
            if not existed:
                shutil.rmtree(root, ignore_errors=True)
            raise
        # A resume logs to memory until it is committed (after the checkpoint is loaded): one refused
        # on the way (data, generator, checkpoint contents) leaves log.txt as it was.
        self._committed = not self.resume
        self._log_handler: logging.Handler = _LogBuffer() if self.resume else self._log_file()
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)
        if lock.stale is not None:
            log.warning(
                "%s was left by pid %s on %s (started %s), which is no longer running: taking it over",
                LOCK_FILE,
                lock.stale.get("pid"),
                lock.stale.get("host"),
                lock.stale.get("started"),
            )
        discard = False
        keep_log = False
        try:
            return self._run(completed)
        except KeyboardInterrupt:
            raise  # an interrupted run keeps its directory, to resume
        except BaseException as exc:
            # Any failure before the first round finished (bad data, a crash in set-up...): leave
            # nothing behind that looks like a result (a failed run keeps log.txt).
            discard = not self.resume and not self.run_dir.read_metrics()
            registry, keep_log = self.recipe._registry, isinstance(exc, RunFailed)
            message = None if keep_log else crash_message(exc, registry, self._where, self._phase)
            if message is None:
                raise
            keep_log = True
            log.error("%s", message, exc_info=exc)  # the traceback goes to log.txt
            raise PluginCrashed(f"{message} (traceback in {self.run_dir.log_path}; --debug prints it)") from exc
        finally:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            lock.release(restore=not self._committed)
            if discard:
                self._discard(existed, found, keep_log)

    def _log_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run_dir.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler

    def _commit(self) -> None:
        """A resume has passed every check and loaded its checkpoint: from here on it writes (the stale
        metrics row of a round that was not checkpointed is dropped; the log goes to log.txt)."""
        if self._committed:
            return
        if self._rows_to_keep is not None:
            self.run_dir.write_metrics(self._rows_to_keep)
        buffered = self._log_handler
        handler = self._log_file()
        assert isinstance(buffered, _LogBuffer)
        for record in buffered.records:
            handler.handle(record)
        log.addHandler(handler)
        log.removeHandler(buffered)
        self._log_handler = handler
        self._committed = True

    def _discard(self, existed: bool, found: set[str], keep_log: bool = False) -> None:
        """Remove what this run wrote: the whole directory when this run created it, else only the paths
        that were not there when it started (``found``); ``keep_log`` keeps log.txt and run.json."""
        if keep_log:
            remove_new_paths(self.run_dir.root, found | {self.run_dir.log_path.name, RUN_FILE})
            return
        if not existed:
            shutil.rmtree(self.run_dir.root, ignore_errors=True)
            return
        remove_new_paths(self.run_dir.root, found)

    def _run(self, completed: int) -> dict[str, Any]:
        recipe = self.recipe
        log.info("%s run '%s' in %s", "resuming" if completed else "starting", recipe.name, self.run_dir.root)
        seed_everything(recipe.seed)
        self._phase = "load data"
        data = load_server_data(recipe)
        self._phase = "build components"
        ctx = ServerContext(recipe, self.run_dir, data, tracking_phases(self.events))
        if recipe.aggregator is not None:
            ctx.aggregator = recipe.build("aggregator", recipe.aggregator)  # type: ignore[assignment]
        algorithm = recipe.build("algorithm", recipe.algorithm)
        assert isinstance(algorithm, Algorithm)
        if recipe.generator is not None and not algorithm.needs_generator:
            log.info("algorithm '%s' does not use the generator: not building it", recipe.algorithm.name)
        elif recipe.generator is not None:
            generator = recipe.build("generator", recipe.generator)
            self._phase = "generator build"
            generator.build(  # type: ignore[attr-defined]
                ctx.task,
                seed=ctx.seed_for("generator"),
                cache_dir=cache_dir(),
                public=data.public,
                progress=progress_events(self.events),
            )
            ctx.generator = generator  # type: ignore[assignment]
        ctx.alignment_losses = [(recipe.build("alignment_loss", s), s.weight) for s in recipe.alignment_losses]  # type: ignore[misc]
        backend = self.backend if self.backend is not None else recipe.build("backend", recipe.backend)
        assert isinstance(backend, Backend)
        self.loggers = [
            (f"loggers.{i}", spec.name, recipe.build("logger", spec)) for i, spec in enumerate(recipe.loggers)
        ]
        self.logger_failures: list[dict[str, Any]] = []
        ctx.attach_backend(backend)
        ctx.rounds_completed_at_start = completed
        self._phase = "backend start"
        backend.start(ctx)
        try:
            self._phase = "algorithm setup"
            algorithm.setup(ctx)
            if completed:
                self._phase = "resume"
                self._load_checkpoint(ctx, algorithm, completed)
            self._commit()
            resolved = recipe.resolved()
            self._notify_loggers("start", self.run_dir.root, resolved)
            rounds = recipe.federation.rounds
            self.events("run_start", rounds=rounds, completed=completed)
            for round_index in range(completed, rounds):
                row = self._round(ctx, algorithm, round_index)
                self._notify_loggers("log_round", round_index, row)
            self._where, self._phase = "after the last round", "finish"
            summary = run_summary(self.recipe, self.run_dir.read_metrics())
            if self.logger_failures:
                summary["logger_failures"] = self.logger_failures
            atomic_write_json(self.run_dir.summary_path, summary)
            self._notify_loggers("finish", summary)
            if self.logger_failures and "logger_failures" not in summary:  # a logger failed in finish
                atomic_write_json(self.run_dir.summary_path, {**summary, "logger_failures": self.logger_failures})
            log.info("finished: %s", json.dumps(summary, sort_keys=True))
            return summary
        finally:
            backend.stop()

    def _notify_loggers(self, method: str, *args: Any) -> None:
        """Call ``method`` on every logger. A logger that raises is recorded (log.txt, the summary's
        ``logger_failures``, a ``logger_failure`` event) and called no more; the run goes on, since
        the run directory already holds everything a logger reports."""
        failed = {f["logger"] for f in self.logger_failures}
        for path, name, logger in self.loggers:
            if path in failed:
                continue
            assert isinstance(logger, Logger)
            try:
                getattr(logger, method)(*args)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.logger_failures.append({"logger": path, "name": name, "in": method, "reason": reason})
                log.warning("logger '%s' (%s) failed in %s and is switched off: %s", name, path, method, reason)
                self.events("logger_failure", logger=name, path=path, method=method, reason=reason)

    def _round(self, ctx: ServerContext, algorithm: Algorithm, round_index: int) -> dict[str, Any]:
        start = time.perf_counter()
        crash_point("round_start")
        seed_everything(ctx.seed_for("round", round_index))
        ctx.begin_round(round_index)
        self.events("round_start", round=round_index + 1, rounds=self.recipe.federation.rounds)
        owner = f"algorithm '{self.recipe.algorithm.name}'"
        self._where, self._phase = f"round {round_index + 1}", "run_round"
        try:
            metrics = check_metrics(algorithm.run_round(ctx, round_index), owner)
            self._phase = "evaluate"
            metrics.update(check_metrics(algorithm.evaluate(ctx, round_index), owner))
        except RoundFailed as exc:  # its message names the round and phase
            log.error("%s", exc)
            raise RunFailed(str(exc)) from None
        except PluginOutputError as exc:
            log.error("%s", exc)
            raise RunFailed(f"round {round_index + 1}: {exc}") from None
        stats = ctx.stats
        row: dict[str, Any] = {"round": round_index + 1, "clients_sampled": ctx.sampled}
        row.update(metrics)
        row["failures"] = stats.failures
        up = [stats.bytes_up.get(k, 0) for k in ctx.sampled]
        down = [stats.bytes_down.get(k, 0) for k in ctx.sampled]
        row["bytes_up_per_client"] = float(np.mean(up)) if up else 0.0
        row["bytes_down_per_client"] = float(np.mean(down)) if down else 0.0
        row["bytes_up_total"] = int(sum(stats.bytes_up.values()))
        row["bytes_down_total"] = int(sum(stats.bytes_down.values()))
        for phase, seconds in stats.phase_seconds.items():
            row[f"seconds_{phase}"] = seconds
        if self.recipe.privacy is not None:
            row["privacy_epsilon"] = self._epsilon_spent(ctx)
        self._phase = "commit_round"
        ctx.commit_round(round_index)
        row["seconds_round"] = time.perf_counter() - start
        # Metrics first, then the checkpoint: a crash in between re-runs the round on resume and the
        # stale metrics row is dropped (see _prepare_directory).
        self.run_dir.append_metrics(row)
        crash_point("metrics_written")
        self._phase = "checkpoint"
        self._save_checkpoint(ctx, algorithm, round_index + 1)
        log.info("round %d: %s", round_index + 1, json.dumps({k: v for k, v in row.items() if k != "client_accuracy"}))
        self.events("round_end", round=round_index + 1, metrics=row)
        return row

    def _epsilon_spent(self, ctx: ServerContext) -> float:
        """The largest ε any client reported so far: each client counts its own uploads (failed and
        re-run rounds included) in its ledger and reports its ε with every reply; the server does not
        count for it. Earlier rounds' rows carry what was reported before a resume."""
        earlier = [float(row.get("privacy_epsilon", 0.0)) for row in self.run_dir.read_metrics()]
        return max([0.0, *earlier, *ctx.reported_epsilon.values()])

    def _save_checkpoint(self, ctx: ServerContext, algorithm: Algorithm, rounds_completed: int) -> None:
        directory = self.run_dir.checkpoint_dir
        values, arrays = algorithm.state()
        arrays_name = f"algorithm.r{rounds_completed}.safetensors"
        save_safetensors(directory / arrays_name, arrays)
        if ctx.generator is not None:  # only built for algorithms that use it
            ctx.generator.save_adapter(directory / f"generator.r{rounds_completed}.safetensors")
        files = {arrays_name: sha256_file(directory / arrays_name)}
        if ctx.generator is not None:
            name = f"generator.r{rounds_completed}.safetensors"
            files[name] = sha256_file(directory / name)
        for name, path in self.run_dir.client_checkpoints(rounds_completed).items():
            files[name] = sha256_file(path)
        state = {
            "rounds_completed": rounds_completed,
            "algorithm": values,
            "algorithm_arrays": arrays_name,
            "recipe_sha256": sha256(self.run_dir.recipe_path.read_bytes()),
            "files": files,
        }
        text = json.dumps(to_jsonable(state), indent=2, sort_keys=True) + "\n"
        digest = sha256(text.encode("utf-8"))
        self.record.pending(digest)  # run.json holds the new state's hash before the state is in place
        atomic_write_text(directory / STATE_FILE, text)
        self.record.commit(digest)
        for old in directory.glob("*.r*.safetensors"):
            match = re.fullmatch(r"(algorithm|generator)\.r(\d+)\.safetensors", old.name)
            if match and int(match.group(2)) < rounds_completed:
                old.unlink(missing_ok=True)

    def _load_checkpoint(self, ctx: ServerContext, algorithm: Algorithm, completed: int) -> None:
        """Load the verified checkpoint; a state that does not fit the algorithm or generator is refused."""
        directory = self.run_dir.checkpoint_dir
        state_path = directory / STATE_FILE
        state = read_json_file(state_path, "checkpoint state")
        if sha256(state_path.read_bytes()) != self.record.state_sha256:
            raise UserError(f"cannot resume {self.run_dir.root}: {state_path} changed while the run started")
        where = f"cannot resume {self.run_dir.root}: {state_path}"
        arrays = load_safetensors(directory / state["algorithm_arrays"])
        try:
            algorithm.load_state(state["algorithm"], arrays)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise UserError(
                f"{where}: the algorithm's state does not fit '{self.recipe.algorithm.name}' "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if ctx.generator is not None:
            name = f"generator.r{completed}.safetensors"
            if name not in state["files"]:
                raise UserError(f"{where} records no generator checkpoint ({name}) for a run that uses one")
            ctx.generator.load_adapter(directory / name)
        log.info("resumed after round %d", completed)
