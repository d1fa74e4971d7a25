"""Orbax checkpoints of a run: the train state, a recipe's auxiliary state (e.g. ART's index
parameters), and JSON metadata (the config, data fingerprints, best dev result). The last N are
kept. The best-by-dev parameters live in `best/`, replaced atomically: they are written to a
fresh `best-<step>/` and the `best` symlink is then swapped in one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

BEST = "best"
# Orbax refuses an empty item: a recipe without auxiliary state saves this instead.
_NO_AUX = {"none": np.zeros((), np.int32)}


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: Orbax restores onto that layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_best_params(best: str | os.PathLike, like: Any) -> Any:
    """Host (numpy) copies of the parameters in a run's `best/` folder, restored onto the
    structure, shapes and dtypes of `like` (host arrays)."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    restored = ocp.StandardCheckpointer().restore((Path(best) / "params").absolute(), target)
    return jax.tree.map(np.asarray, restored)


class Manager:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "aux", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, aux: Any, meta: dict[str, Any]) -> None:
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                aux=ocp.args.StandardSave(aux if aux is not None else _NO_AUX),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, state_like: Any, aux_like: Any) -> tuple[Any, Any, dict]:
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(state_like)),
                aux=ocp.args.StandardRestore(
                    abstract(aux_like) if aux_like is not None else _NO_AUX
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        aux = out["aux"] if aux_like is not None else None
        return out["state"], aux, dict(out["meta"])

    def save_best(self, params: Any, info: dict[str, Any]) -> Path:
        """Writes `best-<step>/` (params + best.json), then points `best` at it atomically."""
        root = self.directory.parent
        target = root / f"{BEST}-{info['step']}"
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(target / "params", params, force=True)
        ckpt.wait_until_finished()
        multihost_utils.sync_global_devices("jaxret-best-saved")
        if jax.process_index() == 0:
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
        multihost_utils.sync_global_devices("jaxret-best-linked")
        return root / BEST

    def wait(self) -> None:
        self._mgr.wait_until_finished()
