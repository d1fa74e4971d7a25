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

Auxiliary state kept in the latest step only (`aux_latest_only`, ART's rolling index: 32 GB
at the paper's size): once a newer step is complete and sealed, older steps' `aux/` is
removed, after a `jaxret_aux_dropped` marker is written into the step (so a kill between the
two leaves a step that is known to have no aux). Such a step restores its train state and
metadata and no aux; the method rebuilds it.
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

log = logging.getLogger(__name__)
BEST = "best"
CHECKSUMS = "jaxret_checksums"  # <step>/jaxret_checksums.<process>.json
AUX_DROPPED = "jaxret_aux_dropped"  # <step>/jaxret_aux_dropped: its aux/ was removed
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


class Manager:
    def __init__(self, directory: Path, keep: int = 3, aux_latest_only: bool = False):
        self.directory = Path(directory).absolute()
        self.aux_latest_only = aux_latest_only
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                # The aux is ART's rolling index: embeddings do not compress (zstd saves ~8 %)
                # and compressing them costs ~13× the CPU of writing them (0.79 vs 0.06 CPU-s
                # per 128 MB here), work that competes with the next training steps.
                "aux": ocp.PyTreeCheckpointHandler(use_compression=False),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._sealer: _Background | None = None
        self._best: _Background | None = None
        if jax.process_index() == 0:
            clear_unlinked_best(self.directory.parent)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def seal(self) -> None:
        """Records, for every finished step that has none, the checksums of the files this
        process wrote (`<step>/jaxret_checksums.<process>.json`)."""
        self._mgr.wait_until_finished()
        me = jax.process_index()
        for step in self._mgr.all_steps():
            folder = self.directory / str(step)
            out = folder / f"{CHECKSUMS}.{me}.json"
            if folder.is_dir() and not out.is_file():
                tmp = folder / f"{CHECKSUMS}.{me}.json.tmp"
                tmp.write_text(json.dumps(file_checksums(folder, lambda owner: owner == me)))
                os.replace(tmp, out)

    def drop_older_aux(self) -> list[int]:
        """Removes `aux/` from every step but the newest, once the newest is sealed (its save
        complete): marker first, then the files. Process 0 does it (the steps are on a
        filesystem all processes share, as Orbax requires)."""
        steps = sorted(self._mgr.all_steps())
        if jax.process_index() != 0 or not steps or not self.sealed(steps[-1]):
            return []
        dropped = []
        for step in steps[:-1]:
            folder = self.directory / str(step)
            if (folder / "aux").is_dir():
                (folder / AUX_DROPPED).write_text(f"aux kept only in step {steps[-1]}\n")
                shutil.rmtree(folder / "aux")
                dropped.append(step)
        return dropped

    def has_aux(self, step: int) -> bool:
        return not (self.directory / str(step) / AUX_DROPPED).is_file()

    def sealed(self, step: int) -> bool:
        return any(
            not p.name.endswith(".tmp") for p in (self.directory / str(step)).glob(f"{CHECKSUMS}*")
        )

    def set_aside(self, step: int, why: str) -> Path:
        """Renames a damaged step out of Orbax's sight (never deletes it)."""
        target = self.directory / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.rename(self.directory / str(step), target)
            log.warning("checkpoint %d is damaged (%s): set aside as %s", step, why, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxret-set-aside-{step}")
        self._mgr.reload()
        return target

    def newest_good_step(self) -> int | None:
        """The newest step whose files match their checksums; damaged newer ones are set
        aside. Every process verifies its own files; they agree before acting."""
        while True:
            step = self._mgr.latest_step()
            if step is None:
                return None
            folder = self.directory / str(step)
            problem = verify(folder, jax.process_index(), jax.process_count())
            if jax.process_count() > 1:  # each verified its own share: equal work, then agree
                bad = multihost_utils.process_allgather(np.int32(problem is not None))
                problem = problem or ("damaged (seen by another process)" if bad.any() else None)
            if problem is None:
                return step
            self.set_aside(step, problem)

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, aux: Any, meta: dict[str, Any]) -> None:
        """Starts saving `step` and returns once the arrays are copied off the devices: the
        files are written, then checksummed (sealed), in the background while training goes
        on (at the paper's size a process's share of a rolling index is GBs: hashing it on
        the training thread would stall the next step)."""
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
        log.info(
            "checkpoint %d: %.2fs on the training thread; written and sealed in the background",
            step,
            time.perf_counter() - t0,
        )
        self._sealer = _Background("seal", self._seal_in_background)

    def _seal_in_background(self) -> None:
        self.seal()
        if self.aux_latest_only:
            self.drop_older_aux()

    def _join_sealer(self) -> None:
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.join()

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, state_like: Any, aux_like: Any) -> tuple[Any, Any, dict]:
        """(state, aux, meta) of `step`; aux is None when the method has none or the step's
        was dropped (`aux_latest_only`)."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract(state_like)),
            "meta": ocp.args.JsonRestore(),
        }
        if self.has_aux(step):
            template = abstract(aux_like) if aux_like is not None else _NO_AUX
            items["aux"] = ocp.args.PyTreeRestore(
                template, restore_args=ocp.checkpoint_utils.construct_restore_args(template)
            )
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        aux = out["aux"] if aux_like is not None and "aux" in items else None
        return out["state"], aux, dict(out["meta"])

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
        self._join_best()
        self._join_sealer()
        self.seal()
