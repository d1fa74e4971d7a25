"""The one training loop every method runs on.

A method (ART, SPAR, QGen, LaPraDoR) is a `Runner` subclass: its placed train state, its
jitted step, a function from step number to global batch, and optionally a dev evaluation, an
after-step hook (ART's index refresh), an auxiliary checkpoint item, an export and a final
test. The loop owns everything else:

* resume: the latest Orbax checkpoint is restored exactly (the data position is the step);
  the config and the data fingerprints saved with the run must match, else it is refused
  naming the changed keys (`train.allow_config_change=true` overrides);
* logs: metrics.jsonl + TensorBoard (trimmed on resume), a progress bar with loss, steps/s
  and ETA, and training.png at the end;
* best-by-dev parameters in `best/` (atomic), the last N checkpoints, the final HF export;
* a step whose loss or gradients are not finite is skipped by the step itself
  (train.state.apply_gradients); the loop logs it, stops after
  `train.max_skipped_in_a_row` skips in a row, and never checkpoints a non-finite state;
* SIGTERM (preemption) saves a checkpoint after the current step and exits cleanly.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxret.configlib import RENAMED, ConfigError
from jaxret.errors import RunError
from jaxret.host_memory import return_free_heap
from jaxret.train import compile_cache, optim
from jaxret.train.checkpoint import Manager, newest_config
from jaxret.train.logs import Logger, plot
from jaxret.train.row_snapshot import Rows, compile_reader
from jaxret.train.state import TrainState, all_finite

log = logging.getLogger(__name__)

# Config keys that may change between an interrupted run and its resumption: they do not
# change what is computed (only how it is reported, saved or laid out on the devices).
RESUMABLE_CHANGES = (
    "train.progress",
    "train.keep_checkpoints",
    "train.rows_save_steps",
    "train.checkpoint_every",
    "train.eval_every",
    "train.allow_config_change",
    "train.max_skipped_in_a_row",
    "train.compile_cache",
    "distributed.",
    "mesh.",
    "data.store",
    "eval.",
    "encode.batch_size",
    "encode.device_batch",
)


class Runner(abc.ABC):
    """A method on the shared loop: subclass it, set the class attributes, and in `__init__`
    place `state` and set `total_steps` (and `lr_at`), by `start_training` or by hand;
    implement `train_step` and `batch_at`.
    Every other hook does nothing unless overridden. `Runner.train` is the whole run.
    """

    name: ClassVar[str] = "run"
    metric: str = "loss"  # dev metric for best-by-dev (ART sets it per config)
    higher_is_better: ClassVar[bool] = True  # False for a dev loss
    loss_label: ClassVar[str] = "loss"
    state: TrainState  # placed on the mesh
    total_steps: int
    lr_at: Callable[[int], float] | None = None
    # The loop's SIGTERM check, bound before any long work: a corpus encoding or an
    # evaluation calls it between its programs; it raises `Preempted` after a SIGTERM.
    check_stop: Callable[[], None] | None = None

    def start_training(self, cfg: Any, params: Any, mesh: Any, num_items: int) -> None:
        """`total_steps`, `optimizer`, `lr_at` and the train state placed with `shardings`,
        for `num_items` training items (`train.optim.start_training`)."""
        start = optim.start_training(cfg, params, mesh, num_items)
        self.total_steps, self.optimizer, self.lr_at = start.total, start.optimizer, start.lr_at
        self.state, self.shardings = start.state, start.shardings

    @abc.abstractmethod
    def train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """The jitted step (state donated)."""

    @abc.abstractmethod
    def batch_at(self, step: int) -> Any:
        """The global batch of step `step`: a function of the step only (exact resume)."""

    def fingerprints(self) -> dict[str, Any]:
        """What the run's data was (hashes): a resume on other data is refused."""
        return {}

    def evaluate(self, state: TrainState, step: int) -> dict[str, float] | None:
        """Dev metrics of `state` after `step` steps; None: no dev evaluation."""
        return None

    def evaluation(
        self, state: TrainState, step: int
    ) -> Generator[None, None, dict[str, float] | None]:
        """`evaluate` in parts, so that a long evaluation need not stall training: the loop
        runs the part before the first `yield` at once (the only part that may read
        `state`, whose buffers the next step donates) and each later part after one more
        training step (ART's search in `eval.slices` slices). Returns `evaluate`'s value.
        By default one part. An evaluation due at a checkpoint step starts after the next
        step: it reads `state.params` only (a copy; `opt_state` and `extra` are None)."""
        yield from ()
        return self.evaluate(state, step)

    def after_step(self, state: TrainState, step: int) -> dict[str, float] | None:
        """Work after step `step` (ART's index refresh); returns event values to log."""
        return None

    def aux(self) -> Any:
        """A pytree saved with every checkpoint (also the restore template), or None."""
        return None

    def rows(self) -> Rows | None:
        """Row-sharded state the method overwrites one piece per step (ART's rolling index),
        saved with every checkpoint without a whole copy (train/row_snapshot.py), newest
        only; also the restore template. A method has `aux` or `rows`, not both."""
        return None

    def aux_meta(self) -> dict[str, Any]:
        """JSON saved with the aux."""
        return {}

    def restore_aux(self, aux: Any, meta: dict[str, Any]) -> None:
        """After a resume: the checkpoint's aux (None when it kept none) and its meta; for a
        method with `rows`, the rows' arrays by name (None when not usable)."""
        return None

    def export(self, params: Any, folder: Path) -> None:
        """The final parameters (host copies) written to `folder` (process 0 only); the loop
        gathers them only for a method that overrides this."""
        return None

    def finish(self, state: TrainState) -> dict[str, Any]:
        """After the last step: the final test etc., merged into the summary."""
        return {}

    def summary(self) -> dict[str, Any]:
        """What `train` returns besides the loop's summary (e.g. ART's final index)."""
        return {}

    def bind_stop(self, check: Callable[[], None]) -> None:
        """Called once by the loop with its SIGTERM check, before any long work."""
        self.check_stop = check

    def has(self, hook: str) -> bool:
        """Whether this method overrides `hook` (export is optional)."""
        return getattr(type(self), hook) is not getattr(Runner, hook)

    @classmethod
    def train(cls, cfg: Any, workdir: str | Path) -> dict[str, Any]:
        """Builds the method from `cfg` and trains it in `workdir` (resuming a run there)."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        # Before the runner: building it compiles the train step (minutes for a 3B teacher on
        # a GPU host) and may encode; a resume that will be refused is refused first.
        refuse_changed_config(cfg, workdir)
        with compile_cache.using(cfg.train.get("compile_cache", ""), workdir) as cache:
            runner = cls(cfg, workdir)  # type: ignore[call-arg]
            summary = run(cfg, runner, workdir, cache)
        summary["params"] = summary["state"].params
        summary["compile_cache"] = dataclasses.asdict(cache)
        summary.update(runner.summary())
        return summary


class Preempted(Exception):
    """A SIGTERM arrived during long work: the loop saves and exits."""


def config_dict(cfg: Any) -> dict[str, Any]:
    """A flat {"a.b": value} view of a ConfigDict, JSON-compatible."""
    raw = json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else cfg

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return flat(raw)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs, ignoring RESUMABLE_CHANGES (a run saved before a key was
    renamed is compared under the new name, configlib.RENAMED)."""
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    keys = sorted(set(saved) | set(current))
    changed = [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k) != current.get(k)
        and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    ]
    return changed


def host_tree(tree: Any) -> Any:
    """Numpy copies on every process, gathering leaves that span other processes' devices."""

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


class _Preemption:
    """Remembers a SIGTERM; every process agrees on it before acting."""

    def __init__(self) -> None:
        self.flag = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.asarray(flags).any())

    def check(self) -> None:
        """Raises `Preempted` when any process got a SIGTERM (every process calls it at the
        same point of the same work, so they agree)."""
        if self.requested():
            raise Preempted

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class WorkdirLock:
    """One run per workdir: an exclusive `flock` on WORKDIR/.jaxret.lock, held by process 0
    for the run's life. The kernel releases it when its holder dies (SIGKILL included), so a
    lock is never stale; the file records who holds it, for the refusal message."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".jaxret.lock"
        self._file: Any = None

    def acquire(self) -> None:
        import fcntl
        import socket

        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another jaxret run ({holder}): wait for it, "
                "stop it, or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.ctime()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _refuse(cfg: Any, problems: list[str], workdir: Path) -> None:
    if problems and not cfg.train.get("allow_config_change", False):
        raise ConfigError(
            f"{workdir} holds a run with a different setting; resuming would mix two runs:\n  "
            + "\n  ".join(problems)
            + "\nUse another --workdir, restore the setting, or pass "
            "--config.train.allow_config_change=true to resume anyway."
        )


def refuse_changed_config(cfg: Any, workdir: Path) -> None:
    """Raises ConfigError when `workdir`'s newest checkpoint was saved with another config
    (the data's fingerprints need the built run: `_check_resume` checks them)."""
    saved_cfg = newest_config(Path(workdir) / "checkpoints")
    if saved_cfg is not None:
        _refuse(cfg, config_changes(saved_cfg, config_dict(cfg)), workdir)


def _check_resume(cfg: Any, runner: Runner, meta: dict[str, Any], workdir: Path) -> None:
    current = config_dict(cfg)
    problems = []
    saved_cfg = meta.get("config")
    if saved_cfg is not None:
        problems += config_changes(saved_cfg, current)
    for key, value in runner.fingerprints().items():
        saved = meta.get("fingerprints", {}).get(key)
        if saved is not None and saved != value:
            problems.append(f"data fingerprint {key}: {saved!r} -> {value!r}")
    _refuse(cfg, problems, workdir)
    if problems:
        log.warning("resuming with changed settings:\n  %s", "\n  ".join(problems))


def run(
    cfg: Any, runner: Runner, workdir: str | Path, cache: compile_cache.CacheUse | None = None
) -> dict[str, Any]:
    """Trains `runner` to `runner.total_steps`, resuming from `workdir` if it holds a run.
    `cache`: the run's compile cache use, logged once the first step has run."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()  # before anything reads or writes checkpoints and logs
    try:
        return _run(cfg, runner, workdir, cache)
    finally:
        lock.release()


def _run(
    cfg: Any, runner: Runner, workdir: Path, cache: compile_cache.CacheUse | None
) -> dict[str, Any]:
    t = cfg.train
    # A row snapshot is off the devices before the next checkpoint starts another.
    rows_steps = min(int(t.get("rows_save_steps", 50)), int(t.checkpoint_every))
    manager = Manager(workdir / "checkpoints", t.keep_checkpoints, rows_steps)
    # Installed before any long work (the resume's encoding, the first evaluation).
    preemption = _Preemption()
    preemption.install()
    runner.bind_stop(preemption.check)
    meta: dict[str, Any] = {
        "method": runner.name,
        "best": None,
        "config": config_dict(cfg),
        "fingerprints": runner.fingerprints(),
    }
    state = runner.state

    def resumable() -> int | None:
        """The newest step verified against its checksums (with row state: one whose rows
        are whole, so that the resume is exact, if there is one)."""
        step = manager.newest_good_step()
        if step is not None and runner.rows() is not None:
            step = manager.step_with_rows(step)
        return step

    resumed = resumable()
    while resumed is not None:
        # A step that cannot be read (damaged before it was sealed) is set aside like one
        # whose checksums differ; a changed config is the user's to fix (ConfigError).
        try:
            saved = manager.read_meta(resumed)
            _check_resume(cfg, runner, saved, workdir)
            aux_like = runner.aux()
            state, aux, saved = manager.restore(resumed, runner.state, aux_like)
            rows_like = runner.rows()
            if rows_like is not None:
                aux = manager.restore_rows(resumed, rows_like)
            break
        except ConfigError:
            raise
        except Exception as e:
            if manager.sealed(resumed):  # its bytes are as written: not damage, a mismatch
                raise RunError(
                    f"checkpoint {resumed} in {workdir} is intact but does not restore into "
                    f"this run ({type(e).__name__}: {str(e)[:300]})"
                ) from e
            manager.set_aside(resumed, f"{type(e).__name__}: {str(e)[:200]}")
            resumed = resumable()
    if resumed is None and runner.rows() is not None:
        manager.forget_rows_after(0)  # an earlier run's, in a workdir without checkpoints
    if resumed is not None:
        meta["best"] = saved.get("best")
        runner.restore_aux(aux, saved)
        log.warning("%s: resumed from step %d", runner.name, resumed)
    elif jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(meta["config"], indent=2, default=str))
    start = int(jax.device_get(state.step))
    logger = Logger(workdir, start)
    total = runner.total_steps

    # A dev evaluation whose later parts run after later steps (Runner.evaluation):
    # [evaluated step, its parts, that step's parameters, seconds so far], or empty.
    pending: list[Any] = []
    # The parameters of an evaluated step outlive the next step (which donates them) only
    # while its evaluation runs: a copy, for the best-by-dev save (compiled at the first
    # spread evaluation: the one at step 0, or a resume's warm-up).
    copy_params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

    def record(done: int, result: dict[str, float] | None, params: Any, seconds: float) -> None:
        if result is None:  # the method has no dev evaluation
            return
        logger.write(done, "dev", {**result, "eval_seconds": seconds})
        value = result.get(runner.metric)
        best = meta["best"]
        better = lambda a, b: a > b if runner.higher_is_better else a < b
        if value is not None and (best is None or better(value, best["value"])):
            meta["best"] = {"step": done, "value": value, "metric": runner.metric}
            manager.save_best(params, meta["best"])

    def advance() -> None:
        """The next part of the pending evaluation (recorded when it was the last)."""
        done, parts, params, seconds = pending
        t0 = time.perf_counter()
        try:
            next(parts)
        except StopIteration as stop:
            pending.clear()
            record(done, stop.value, params, seconds + time.perf_counter() - t0)
        except Preempted:
            pending.clear()
            logger.write(done, "event", {"dev_evaluation_dropped": float(done)})
            raise
        else:
            pending[3] += time.perf_counter() - t0

    def evaluate(done: int, at_once: bool = True, later: bool = False) -> None:
        """Evaluates the parameters after `done` steps: the first part now (`later`: after
        the next step, on a copy of the parameters), the rest one part after each following
        step unless `at_once` (or all at once if none is pending; an unfinished earlier
        evaluation is finished first)."""
        while pending:
            advance()
        if later:
            params = copy_params(state.params)
            kept = state.replace(params=params, opt_state=None, extra=None)
            pending[:] = [done, runner.evaluation(kept, done), params, 0.0]
            return
        parts = runner.evaluation(state, done)
        t0 = time.perf_counter()
        try:
            next(parts)
        except StopIteration as stop:
            record(done, stop.value, state.params, time.perf_counter() - t0)
            return
        pending[:] = [done, parts, copy_params(state.params), time.perf_counter() - t0]
        while at_once and pending:
            advance()

    def warm_up(done: int) -> None:
        """A resumed run evaluates once before its first step: the evaluation's programs
        compile here instead of inside the first scheduled evaluation, a stall in the
        middle of training (4× a step in the rehearsal, docs/scaling.md). Unlogged,
        unless the checkpoint's step was due an evaluation that was never recorded (one
        spread over steps that a SIGTERM or a kill cut short): then it is that evaluation."""
        t0 = time.perf_counter()
        due = done % t.eval_every == 0
        if due and not any(r["step"] == done and r["kind"] == "dev" for r in logger.read()):
            evaluate(done)
            return
        parts = runner.evaluation(state, done)
        try:
            while True:
                next(parts)
        except StopIteration as stop:
            if stop.value is not None:
                logger.write(done, "event", {"warm_up_seconds": time.perf_counter() - t0})

    # One compiled reduction, compiled here: op by op, its first call at the first
    # checkpoint cost seconds (one small program per parameter), a stall in the middle of
    # training.
    params_finite = jax.jit(all_finite)
    params_finite(state.params).block_until_ready()
    if (rows := runner.rows()) is not None:  # the same for the row snapshot's reads
        compile_reader(rows)

    def checkpoint(done: int, last: bool) -> None:
        """Saves step `done`; `last`: no step follows in this process (its row state is
        copied off the devices now instead of over the next steps)."""
        if not bool(jax.device_get(params_finite(state.params))):
            raise RunError(f"step {done}: parameters are not finite; not checkpointing them")
        extra = runner.aux_meta()
        t0 = time.perf_counter()
        aux, rows = runner.aux(), runner.rows()
        if aux is not None and rows is not None:
            raise TypeError(f"{runner.name}: a method saves aux or rows, not both")
        manager.save(done, state, aux, {**meta, **extra}, rows, rows_at_once=last)
        # What the save held the training thread for (the writing goes on in the background).
        logger.write(done, "event", {"checkpoint_seconds": time.perf_counter() - t0})

    def give_back_heap(done: int) -> None:
        """Returns the heap that compiling and setting up freed to the OS (glibc keeps it:
        +374 MB resident after the first step in the rehearsal, docs/scaling.md): once
        before the first step and once after it, when the one-off allocations are over."""
        t0 = time.perf_counter()
        released = return_free_heap()
        if released is not None:
            logger.write(
                done,
                "event",
                {"heap_returned_mb": released / 2**20, "trim_seconds": time.perf_counter() - t0},
            )

    bar = tqdm(total=total, initial=start, desc=runner.name, unit="step", disable=not t.progress)
    max_skips = int(t.get("max_skipped_in_a_row", 5))
    last_saved, preempted = None, False
    try:
        if start == 0 and cfg.eval.get("at_start", True):
            evaluate(0)
        elif start > 0:
            warm_up(start)
        give_back_heap(start)
        for step in range(start, total):
            t0 = time.perf_counter()
            manager.before_step(runner.rows())  # a saved row piece this step overwrites
            state, metrics = runner.train_step(state, runner.batch_at(step))
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            done = step + 1
            values["step_seconds"] = time.perf_counter() - t0
            if runner.lr_at is not None:
                values["lr"] = float(runner.lr_at(step))
            if values.get("skipped"):
                in_a_row = int(jax.device_get(state.skipped_in_a_row))
                log.warning(
                    "step %d: non-finite loss or gradients, update skipped (%d in a row)",
                    done,
                    in_a_row,
                )
                if in_a_row >= max_skips:
                    raise RunError(
                        f"{in_a_row} steps in a row had a non-finite loss or gradients (up to "
                        f"step {done}); stopping. The last checkpoint holds finite parameters."
                    )
            info = None
            try:
                info = runner.after_step(state, done)
            except Preempted:  # mid-refresh: the checkpoint's aux rebuilds the index on resume
                preempted = True
            # A step's wall time includes the method's work after it (e.g. an index refresh):
            # that is the stall a user waits for.
            values["wall_seconds"] = time.perf_counter() - t0
            logger.write(done, "train", values)
            if info:
                logger.write(done, "event", info)
            bar.update(1)
            bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
            due = done % t.eval_every == 0 or done == total
            saving = done % t.checkpoint_every == 0 or done == total
            try:
                # One stall between two steps at most: a checkpoint step runs no evaluation
                # part (the save holds the training thread), and an evaluation due there
                # starts after the next step, on a copy of this step's parameters.
                if pending and not preempted and not saving:
                    advance()
                if due and not preempted:
                    evaluate(done, at_once=done == total, later=saving and done != total)
            except Preempted:
                preempted = True
            preempted = preempted or preemption.requested()
            if preempted and pending:
                # Its parameters live only in memory: finish it before saving. What is left
                # of a spread evaluation is searches of queries encoded already (ART: the
                # whole dev search is seconds at NQ's size), far inside SLURM's 300 s.
                try:
                    while pending:
                        advance()
                except Preempted:  # a part that stops on the signal: dropped (advance logs)
                    log.warning("SIGTERM: an unfinished dev evaluation is dropped")
            if saving or preempted:
                checkpoint(done, last=done == total or preempted)
                last_saved = done
            if preempted:
                log.warning("SIGTERM: saved step %d; resume with the same command", done)
                break
            if step == start:  # the train (and refresh) programs compiled and ran once
                give_back_heap(done)
                if cache is not None and cache.folder is not None:
                    logger.write(done, "event", cache.counts())
    except Preempted:  # before the first step of this process: nothing new to save
        preempted, last_saved = True, start
        log.warning("SIGTERM before step %d: nothing new to save", start + 1)
    finally:
        bar.close()
        preemption.uninstall()
        manager.wait()
    summary: dict[str, Any] = {"method": runner.name, "steps": total, "last_checkpoint": last_saved}
    if preempted:
        summary["preempted_at"] = last_saved
        summary["state"] = state
        logger.close()
        return summary
    rows = logger.read()
    train_rows = [r for r in rows if r["kind"] == "train"]
    summary["final_step_loss"] = train_rows[-1]["loss"] if train_rows else None
    summary["skipped_steps"] = int(jax.device_get(state.skipped))
    summary.update(runner.finish(state))
    if "test_after" in summary:
        logger.write(total, "test", summary["test_after"])
    params = host_tree(state.params) if runner.has("export") else None
    if jax.process_index() == 0:
        if runner.has("export"):
            runner.export(params, workdir / "export")
        summary["plot"] = str(plot(workdir, logger.read(), runner.metric, runner.loss_label))
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    logger.close()
    summary["state"] = state
    return summary
