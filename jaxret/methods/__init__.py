"""The methods jaxret trains, one folder each, all on the one loop (jaxret.train.loop):

  art/        ART (Sachan et al.): a retriever distilled from a teacher's question likelihood
  spar/       SPAR (Chen et al.): Λ, a dense retriever that imitates BM25
  lapradoor/  LaPraDoR (Xu et al.): ICoL pre-training on a bare corpus
  qgen/       query generation: a generator, its synthetic queries, a retriever trained on them

Each folder holds its pure step(s) (`step.py`), its `Runner` subclass (`runner.py`) and its
data. Steps shared by several methods live here: `contrastive.py` (DPR-style in-batch
contrastive step) and `seq2seq.py` (the generator's step). A fifth method is a folder with a
step, a runner and a config, plus one line in METHODS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from jaxret.configlib import ConfigError

# The config's `method` -> the module with its `train(cfg, workdir)` and, where its store can
# be built before the job, `prepare(cfg, workdir, workers, shard_rows)`. Imported on use:
# a command loads only the method it runs.
METHODS = {
    "art": "jaxret.methods.art.runner",
    "spar": "jaxret.methods.spar.runner",
    "lapradoor": "jaxret.methods.lapradoor.runner",
    "qgen": "jaxret.methods.qgen.runner",
}


def method_of(cfg: Any) -> str:
    """The config's method, checked against METHODS."""
    name = cfg.get("method", "art")
    if name not in METHODS:
        raise ConfigError(f"method={name!r}; known: {', '.join(sorted(METHODS))}")
    return name


def trainer(cfg: Any) -> Callable[[Any, Any], dict[str, Any]]:
    """`train(cfg, workdir)` of the config's method."""
    return importlib.import_module(METHODS[method_of(cfg)]).train


def preparer(cfg: Any) -> Callable[..., dict[str, Any]]:
    """`prepare(cfg, workdir, workers, shard_rows)` of the config's method."""
    name = method_of(cfg)
    module = importlib.import_module(METHODS[name])
    if not hasattr(module, "prepare"):
        modules = {m: importlib.import_module(METHODS[m]) for m in sorted(METHODS)}
        able = [m for m, module in modules.items() if hasattr(module, "prepare")]
        raise ConfigError(
            f"jaxret prepare builds the stores of {', '.join(able)}; method={name!r} "
            "builds its own when it starts (each process its copy, no process waiting for "
            "another)"
        )
    return module.prepare
