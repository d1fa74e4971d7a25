"""Orbax checkpoints: the train state, the passage-tower parameters of the last index refresh
(so a resumed run rebuilds exactly the index it had), and JSON metadata (data position,
index fingerprint, best dev result). The last N are kept; the best has its own folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Manager:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "index_params", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, index_params: Any, meta: dict[str, Any]) -> None:
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                index_params=ocp.args.StandardSave(index_params),
                meta=ocp.args.JsonSave({**meta, "step": step, "data_position": step}),
            ),
        )

    def restore(self, step: int, state_like: Any, index_like: Any) -> tuple[Any, Any, dict]:
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(state_like)),
                index_params=ocp.args.StandardRestore(_abstract(index_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["index_params"], dict(out["meta"])

    def save_best(self, params: Any, info: dict[str, Any]) -> None:
        best = self.directory.parent / "best"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(best / "params", params, force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            (best / "best.json").write_text(json.dumps(info, indent=2))

    def wait(self) -> None:
        self._mgr.wait_until_finished()
