"""Orbax checkpoints of a run: the train state, a method's auxiliary state (e.g. ART's index
parameters), and JSON metadata (the config, data fingerprints, best dev result). The last N are
kept. The best-by-dev parameters live in `best/`, replaced atomically: they are written to a
fresh `best-<step>/` and the `best` symlink is then swapped in one rename.

Integrity: once a background save has finished, each process records the size and CRC32 of
every file it wrote in `<step>/jaxret_checksums.<process>.json` ("sealed"). A resume verifies
the newest step (`newest_good_step`; each process its own files): a step whose files do not
match — flipped bytes, a truncated file — or that was never sealed and fails to restore is
renamed `<step>.damaged-<time>` (set aside, never deleted) and the run resumes from the
newest good one, saying so.

Row-sharded state that training overwrites in place (ART's rolling index: 32 GB at the
paper's size) is not in the Orbax step: it goes to `rows-<step>/` piece by piece over the
following steps (`row_snapshot`, `Manager.save(rows=…)` and `before_step`), and only the
newest complete one is kept — older `rows-*/` are removed once a newer one is complete and
its step committed. A step without complete rows restores its train state and metadata;
the method rebuilds the rows. (Steps of an older jaxret whose `aux/` was removed and marked
`jaxret_aux_dropped` still verify.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxret.train import row_snapshot
from jaxret.train.row_snapshot import Rows, RowSnapshot

log = logging.getLogger(__name__)
BEST = "best"
CHECKSUMS = "jaxret_checksums"  # <step>/jaxret_checksums.<process>.json
AUX_DROPPED = "jaxret_aux_dropped"  # <step>/jaxret_aux_dropped: an older jaxret removed aux/
# Orbax refuses an empty item: a method without auxiliary state saves this instead.
_NO_AUX = {"none": np.zeros((), np.int32)}


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: Orbax restores onto that layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _owner(relative: str) -> int:
    """The process that wrote a file of a step: Orbax's `ocdbt.process_<i>/` files are
    process i's, the rest process 0's. Each process seals and verifies its own share, so no
    process hashes the others' files (at the paper's size a rolling index is 32 GB)."""
    m = re.search(r"ocdbt\.process_(\d+)", relative)
    return int(m.group(1)) if m else 0


def file_checksums(folder: Path, mine: Any = lambda owner: True) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of the files under `folder` whose owner `mine` accepts
    (the checksum files themselves excluded)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        skip = p.name.startswith((CHECKSUMS, AUX_DROPPED))
        if p.is_file() and not skip and mine(_owner(rel)):
            out[rel] = [p.stat().st_size, _crc32(p)]
    return out


def verify(folder: Path, process: int = 0, processes: int = 1) -> str | None:
    """None when this process's share of the step's files (owner mod processes == process)
    matches the recorded checksums, or none were recorded (an unsealed step is tried by
    restoring it); else what differs."""
    want: dict[str, list[int]] = {}
    for path in folder.glob(f"{CHECKSUMS}*"):
        if not path.name.endswith(".tmp"):
            want.update(json.loads(path.read_text()))
    mine = lambda owner: owner % processes == process
    have = file_checksums(folder, mine)
    dropped = (folder / AUX_DROPPED).is_file()
    for name, (size, crc) in want.items():
        if not mine(_owner(name)) or (dropped and name.startswith("aux/")):
            continue
        if name not in have:
            return f"{name} is missing"
        if have[name][0] != size:
            return f"{name} has {have[name][0]} bytes, {size} were written"
        if have[name][1] != crc:
            return f"{name} differs from what was written (crc32)"
    return None


class _Background:
    """One piece of work on a daemon thread; `join` waits for it and re-raises its error on
    the calling (training) thread, so a failed background write is never lost."""

    def __init__(self, name: str, work: Any, *args: Any):
        self.error: BaseException | None = None

        def run() -> None:
            row_snapshot.yield_to_training()
            try:
                work(*args)
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True, name=name)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def clear_unlinked_best(root: Path) -> list[Path]:
    """Removes what a killed `save_best` left in `root`: `best-<step>/` folders that `best`
    does not point at (a write that never got linked, or a previous one not yet removed) and
    `.best-<hex>` links never renamed into place. The linked folder is never touched.
    Returns what was removed."""
    link = root / BEST
    current = link.resolve() if link.is_symlink() else None
    removed = []
    for p in sorted(root.glob(f"{BEST}-*")) + sorted(root.glob(f".{BEST}-*")):
        if current is not None and not p.is_symlink() and p.resolve() == current:
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.warning("removed %d unfinished best-parameter writes: %s", len(removed), removed)
    return removed


def newest_config(directory: Path) -> dict[str, Any] | None:
    """The config saved with the newest step in `directory` (None: no step, or its metadata
    unreadable — the resume proper then sets that step aside or falls back). Plain file
    reads, no JAX (Orbax asks JAX for the process index, which would start the backend
    before `jax.distributed.initialize`): it runs before the run is built. The metadata is
    Orbax's JSON item `meta` (`<step>/meta/metadata`)."""
    directory = Path(directory)
    steps = (
        [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    )
    if not steps:
        return None
    try:
        meta = json.loads((directory / str(max(steps)) / "meta" / "metadata").read_text())
    except (OSError, ValueError):  # not this check's to judge
        return None
    return meta.get("config") if isinstance(meta, dict) else None


def _agree(why: str) -> str:
    """`why` (a problem this process found, "" if none), or another process's if it found
    one: every process takes the same branch."""
    if jax.process_count() > 1:
        bad = multihost_utils.process_allgather(np.int32(why != ""))
        why = why or ("not usable on another process" if bad.any() else "")
    return why


class Manager:
    def __init__(self, directory: Path, keep: int = 3, rows_save_steps: int = 50):
        self.directory = Path(directory).absolute()
        self.rows_save_steps = rows_save_steps
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "aux": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._sealer: _Background | None = None
        self._best: _Background | None = None
        self._rows: RowSnapshot | None = None  # the row snapshot being written
        self._seal_lock = threading.Lock()
        if jax.process_index() == 0:
            clear_unlinked_best(self.directory.parent)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def seal(self) -> None:
        """Records, for every finished step that has none, the checksums of the files this
        process wrote (`<step>/jaxret_checksums.<process>.json`). Safe from several threads
        (the background sealer and a caller)."""
        self._mgr.wait_until_finished()
        me = jax.process_index()
        with self._seal_lock:
            for step in self._mgr.all_steps():
                folder = self.directory / str(step)
                out = folder / f"{CHECKSUMS}.{me}.json"
                if folder.is_dir() and not out.is_file():
                    tmp = folder / f"{CHECKSUMS}.{me}.json.tmp"
                    tmp.write_text(json.dumps(file_checksums(folder, lambda owner: owner == me)))
                    os.replace(tmp, out)

    def drop_older_rows(self, newer_than: int | None = None) -> list[int]:
        """Removes every `rows-<step>/` older than the newest complete one whose step is
        committed (and, with `newer_than`, those of later steps: a resume from that step
        left them behind). Process 0 does it (a filesystem all processes share)."""
        if jax.process_index() != 0:
            return []
        folders = row_snapshot.snapshot_steps(self.directory)
        committed = lambda step: (self.directory / str(step)).is_dir()
        good = [s for s, f in folders.items() if committed(s) and row_snapshot.complete(f)]
        keep_from = max(good, default=None)
        dropped = []
        for step, folder in sorted(folders.items()):
            old = keep_from is not None and step < keep_from
            later = newer_than is not None and step > newer_than
            in_progress = self._rows is not None and folder == self._rows.folder
            if (old or later) and not in_progress:
                shutil.rmtree(folder, ignore_errors=True)
                dropped.append(step)
        return dropped

    def sealed(self, step: int) -> bool:
        return any(
            not p.name.endswith(".tmp") for p in (self.directory / str(step)).glob(f"{CHECKSUMS}*")
        )

    def set_aside(self, step: int, why: str, label: str = "damaged") -> Path:
        """Renames a step out of Orbax's sight (never deletes it)."""
        target = self.directory / f"{step}.{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.rename(self.directory / str(step), target)
            log.warning("checkpoint %d is %s (%s): set aside as %s", step, label, why, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxret-set-aside-{step}")
        self._mgr.reload()
        return target

    def _problem(self, step: int) -> str | None:
        """What differs in `step`'s files from their checksums (None: intact). Every process
        verifies its own files (equal work), then they agree."""
        problem = verify(self.directory / str(step), jax.process_index(), jax.process_count())
        if jax.process_count() > 1:
            bad = multihost_utils.process_allgather(np.int32(problem is not None))
            problem = problem or ("damaged (seen by another process)" if bad.any() else None)
        return problem

    def newest_good_step(self) -> int | None:
        """The newest step whose files match their checksums; damaged newer ones are set
        aside."""
        while True:
            step = self._mgr.latest_step()
            if step is None:
                return None
            problem = self._problem(step)
            if problem is None:
                return step
            self.set_aside(step, problem)

    def step_with_rows(self, step: int) -> int:
        """For a method with row state: `step` when its row snapshot is complete; else (a
        kill while it was being written) the newest older step whose snapshot is complete
        and whose files are intact — a resume there continues exactly, where one from
        `step` would re-encode the index — and the steps after it are set aside
        ("superseded"); else `step` (its index is then encoded once)."""
        folders = row_snapshot.snapshot_steps(self.directory)
        full = lambda s: s in folders and row_snapshot.complete(folders[s])
        if full(step):
            return step
        older = [s for s in self._mgr.all_steps() if s < step and full(s)]
        if not older or self._problem(max(older)) is not None:
            return step
        for newer in sorted(s for s in self._mgr.all_steps() if s > max(older)):
            self.set_aside(
                newer, f"its row snapshot was cut short; step {max(older)}'s is whole", "superseded"
            )
        return max(older)

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        aux: Any,
        meta: dict[str, Any],
        rows: Rows | None = None,
        rows_at_once: bool = False,
    ) -> None:
        """Starts saving `step` and returns once the arrays are copied off the devices: the
        files are written, then checksummed (sealed), in the background while training goes
        on (hashing on the training thread would stall the next step). `rows` (see
        row_snapshot) are copied over the next `rows_save_steps` steps (`before_step`), or
        now with `rows_at_once` (the run stops after this step)."""
        self._join_sealer()  # the previous save has finished and is sealed
        t0 = time.perf_counter()
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                aux=ocp.args.PyTreeSave(aux if aux is not None else _NO_AUX),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
        )
        if rows is not None:
            self._start_rows(step, rows, rows_at_once)
        log.info(
            "checkpoint %d: %.2fs on the training thread; written and sealed in the background",
            step,
            time.perf_counter() - t0,
        )
        self._sealer = _Background("seal", self.seal)

    def _start_rows(self, step: int, rows: Rows, at_once: bool) -> None:
        if self._rows is not None:  # its unread pieces still hold its step's rows
            self._rows.finish(rows.arrays)
            self._join_rows()
        # A folder of this step left by an earlier run (a step set aside, a cut-short save)
        # was removed at the start (`forget_rows_after`): every process writes only its own
        # files, so no process removes another's.
        folder = self.directory / f"{row_snapshot.PREFIX}{step}"
        per_step = row_snapshot.pieces_per_step(rows.pieces, self.rows_save_steps)
        self._rows = RowSnapshot(folder, rows, per_step)
        if at_once:
            self._rows.finish(rows.arrays)

    def before_step(self, rows: Rows | None) -> None:
        """Before every train step: the pieces of the row snapshot being written that this
        step overwrites (and its share of the rest) are read first."""
        if self._rows is None or rows is None:
            return
        if not self._rows.all_dispatched:
            self._rows.before_step(rows.arrays)
        elif not self._rows.writer.is_alive():
            self._join_rows()

    def _join_rows(self) -> None:
        snapshot, self._rows = self._rows, None
        if snapshot is not None:
            snapshot.join()
            self.drop_older_rows()

    def restore_rows(self, step: int, like: Rows) -> dict[str, jax.Array] | None:
        """The rows saved with `step`, written into `like`'s arrays (donated: use the
        returned ones), each row read from wherever it was saved (a resume on another
        device count or padding) and read once, its CRC32 checked as it is read. None
        (said why) when they are missing, incomplete or of another row width or dtype
        (`like` untouched), or damaged (found while reading: `like` is consumed, the
        method allocates its rows again to rebuild them). Processes agree."""
        folder = self.directory / f"{row_snapshot.PREFIX}{step}"
        why = row_snapshot.check(folder, like.arrays, verify=False) if folder.is_dir() else "none"
        why = _agree(why)
        arrays = None
        if not why:  # written into `like`'s buffers (donated): no second copy of the index
            arrays, why = row_snapshot.load(folder, like.arrays)
            why = _agree(why)
        if why:
            arrays = None
            log.warning("checkpoint %d: its row state is not used (%s); it is rebuilt", step, why)
        self.forget_rows_after(step)
        return arrays

    def forget_rows_after(self, step: int) -> None:
        """At the start of a run (from `step`, 0 when fresh): removes row snapshots of later
        steps (a step set aside, an earlier run's) and older ones, before any process can
        write one — the first save is steps away, behind the train steps' collectives."""
        self.drop_older_rows(newer_than=step)

    def _join_sealer(self) -> None:
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.join()

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, state_like: Any, aux_like: Any) -> tuple[Any, Any, dict]:
        """(state, aux, meta) of `step`; aux is None when the method has none (or the step's
        was removed by an older jaxret)."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract(state_like)),
            "meta": ocp.args.JsonRestore(),
        }
        has_aux = not (self.directory / str(step) / AUX_DROPPED).is_file()
        if aux_like is not None and has_aux:
            template = abstract(aux_like)
            items["aux"] = ocp.args.PyTreeRestore(
                template, restore_args=ocp.checkpoint_utils.construct_restore_args(template)
            )
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out.get("aux") if "aux" in items else None, dict(out["meta"])

    def save_best(self, params: Any, info: dict[str, Any]) -> Path:
        """Starts writing `best-<step>/` (params + best.json) and returns once the arrays are
        off the devices; when the write has finished, a background thread points `best` at
        it atomically and removes the previous one (until then `best` is the previous,
        complete folder). The next save_best or `wait` waits for it."""
        self._join_best()
        root = self.directory.parent
        target = root / f"{BEST}-{info['step']}"
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(target / "params", params, force=True)
        self._best = _Background("best", self._link_best, ckpt, target, dict(info))
        return root / BEST

    def _link_best(self, ckpt: Any, target: Path, info: dict[str, Any]) -> None:
        ckpt.wait_until_finished()  # every process's share written and committed
        if jax.process_index() != 0:
            return
        root = target.parent
        (target / "best.json").write_text(json.dumps(info, indent=2))
        link = root / BEST
        if link.exists() and not link.is_symlink():  # a folder from an older jaxret
            shutil.rmtree(link)
        tmp = root / f".{BEST}-{uuid.uuid4().hex}"
        os.symlink(target.name, tmp)
        previous = link.resolve() if link.is_symlink() else None
        os.replace(tmp, link)  # atomic: `best` is always a complete folder
        if previous is not None and previous != target.resolve() and previous.exists():
            shutil.rmtree(previous, ignore_errors=True)

    def _join_best(self) -> None:
        best, self._best = self._best, None
        if best is not None:
            best.join()

    def wait(self) -> None:
        """Waits for every background write; a row snapshot not yet read whole (the run
        stopped on an error) is abandoned: its folder stays incomplete, never read."""
        self._join_best()
        self._join_sealer()
        self.seal()
        if self._rows is not None and not self._rows.all_dispatched:
            self._rows.abandon()
            self._rows = None
        self._join_rows()
