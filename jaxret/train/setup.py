"""The set-up every method's runner shares, written once: the retriever on the mesh, the
run's token store, the corpus's token rows on the devices, the step's batch shardings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from jaxret.data.corpus_store import TokenTable
from jaxret.data.tokenization import load_tokenizer
from jaxret.index.encode import tables_on_device, token_keys
from jaxret.index.mips import RowLayout
from jaxret.models import dual_encoder as de
from jaxret.parallel.activations import Activations
from jaxret.parallel.axes import DATA
from jaxret.parallel.host_data import place
from jaxret.train.loop import Runner

log = logging.getLogger(__name__)


def store_folder(cfg: Any, workdir: str | Path) -> Path:
    """The run's token store: `data.store`, else WORKDIR/store."""
    return Path(cfg.data.store) if cfg.data.store else Path(workdir) / "store"


def prepare_hint(store: Path) -> str:
    """The command that builds a missing store before a multi-process job."""
    return (
        "jaxret prepare --config=<the same config and overrides> --workdir=<the run's "
        f"workdir> (store {store})"
    )


def load_retriever(
    cfg: Any, mesh: Mesh, spec: de.EncoderSpec | None = None
) -> tuple[de.DualEncoder, Any, Any]:
    """(encoder, host params, tokenizer) of `cfg.model` (`spec`: its encoder spec, as given),
    the encoder's activations laid out for `cfg.mesh.param_sharding` on `mesh`."""
    spec = spec or de.EncoderSpec.from_config(cfg.model)
    encoder, params, tok_folder = de.from_pretrained(
        cfg.model.name, spec, cfg.model.passage_name or None, jax.random.key(cfg.seed)
    )
    encoder = encoder.with_activations(Activations.for_strategy(mesh, cfg.mesh.param_sharding))
    return encoder, params, load_tokenizer(tok_folder)


def rows_on_devices(
    table: TokenTable, mesh: Mesh, cfg: Any, keys: tuple[str, ...] | None = None
) -> tuple[RowLayout, dict[str, jax.Array]]:
    """(layout, device tables) of a token table: its rows split over every device in whole
    `encode.chunk_rows` chunks (the index's layout), `keys` the columns (default: the
    passage format's)."""
    layout = RowLayout.for_mesh(len(table), mesh, cfg.encode.chunk_rows)
    keys = keys or token_keys(cfg.model.passage_format)
    return layout, tables_on_device(table, layout, mesh, keys)


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """The in_shardings of a global batch: every leaf split over the data axis."""
    sharding = NamedSharding(mesh, DATA)
    return jax.tree.map(lambda _: sharding, batch)


class RetrieverRunner(Runner):
    """A runner that trains a dual encoder (`self.encoder`, `self.tokenizer`) from host
    parameters `self.initial_params` placed with `self.shardings`: its export is the HF
    towers + jaxret.json, and its final test compares with the starting parameters."""

    encoder: de.DualEncoder
    tokenizer: Any
    initial_params: Any
    shardings: Any

    def start_training(self, cfg: Any, params: Any, mesh: Any, num_items: int) -> None:
        """`Runner.start_training`, and `params` (host) kept as the final test's baseline."""
        super().start_training(cfg, params, mesh, num_items)
        self.initial_params = params

    def export(self, params: Any, folder: Path) -> None:
        de.export(self.encoder, params, folder, self.tokenizer)

    def baseline_params(self) -> Any:
        """The starting parameters on the devices (the final test's "before")."""
        return place(self.initial_params, self.shardings.params)
