"""Reading and writing Hugging Face checkpoints without torch.

A checkpoint is a folder (or a hub id resolved to one) with `config.json` and either
`model.safetensors` or a sharded `model.safetensors.index.json`. `pytorch_model.bin`
is read only through `torch.load(weights_only=True)` when torch is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What a hub download fetches: config, tokenizer files, and safetensors weights; the PyTorch
# pickles only when the repo has no safetensors (a second, narrower download).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
_HUB_PICKLES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _WEIGHT_FILES)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file or tensor."""


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec)) and not spec.startswith(".")


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local folder as is, or a hub id downloaded (or found in the HF cache)."""
    if not str(spec).strip():
        raise CheckpointError("no checkpoint given (the model name or path is empty)")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    spec = str(spec)
    if path.exists() or not _looks_like_hub_id(spec):
        raise CheckpointError(f"{spec!r} is neither a checkpoint folder nor a Hugging Face hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError(f"cannot resolve hub id {spec!r}: huggingface_hub missing") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")

    def download(patterns: list[str]) -> Path | None:
        try:  # the local HF cache first, then (when online) the hub
            return Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=True))
        except Exception:
            if offline:
                return None
        try:
            return Path(snapshot_download(spec, allow_patterns=patterns))
        except Exception as e:
            raise CheckpointError(
                f"could not download {spec!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{e}). If this machine is offline, download the checkpoint elsewhere and pass "
                "its local folder path instead of the hub id."
            ) from e

    folder = download(_HUB_FILES)
    if folder is not None and not has_weights(folder):
        folder = download(_HUB_FILES + _HUB_PICKLES) or folder
    if folder is None:
        raise CheckpointError(
            f"{spec!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            "is set. Download it on a connected machine (`huggingface-cli download "
            f"{spec} --local-dir DIR`) and pass the folder path instead."
        )
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as numpy arrays (bf16 stays bf16 via ml_dtypes)."""
    from safetensors.numpy import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return dict(load_file(str(single)))
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index} names shard {shard} which is missing")
            tensors.update(load_file(str(shard_path)))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise CheckpointError(f"tensors listed in {index} but absent: {sorted(missing)[:5]}")
        return tensors
    bin_index = folder / "pytorch_model.bin.index.json"
    bin_path = folder / "pytorch_model.bin"
    if bin_path.is_file() or bin_index.is_file():
        if bin_index.is_file():
            with open(bin_index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = [bin_path.name]
        tensors = {}
        for shard in shards:
            tensors.update(_read_pickle(folder / shard))
        return tensors
    raise CheckpointError(f"{folder} has none of {', '.join(_WEIGHT_FILES)}")


class TensorSource:
    """A checkpoint folder's tensors, read lazily: names and shapes from the safetensors
    headers, blocks of a tensor through `get_slice` (nothing else is read). PyTorch pickles
    cannot be sliced: they are loaded whole, once, on first use."""

    def __init__(self, folder: Path):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)

        self.folder = folder
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        self._file_of: dict[str, Path] = {}
        self._pickled: dict[str, np.ndarray] | None = None
        if single.is_file():
            self._file_of = {k: single for k in self._keys(single)}
        elif index.is_file():
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard} which is missing")
            self._file_of = {k: folder / v for k, v in weight_map.items()}
        else:
            self._pickled = read_tensors(folder)
        self._shapes: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return list(f.keys())

    def names(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(str(self._file_of[name]), framework="np") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def read(self, name: str, block: tuple[slice, ...] | None = None) -> np.ndarray:
        if self._pickled is not None:
            full = self._pickled[name]
            return full if block is None else full[block]
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="np") as f:
            part = f.get_slice(name)
            if block is None:
                return part[:]
            # safetensors does not clip slices as numpy does.
            shape = part.get_shape()
            block = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(block, shape))
            return part[block]


def place_params(
    source: TensorSource,
    rules: Iterable[TensorRule],
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    shardings: Any,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
) -> dict:
    """Global jax.Arrays built with `make_array_from_callback`: every device's block is read
    from the checkpoint by the process that owns the device, and only that block (a process
    never holds a whole sharded parameter, and no cross-host equality check runs).

    Missing, unexpected and mis-shaped tensors are errors, as in `tensors_to_params`."""
    import jax

    rules = list(rules)
    _check_names(source.names(), rules, ignore, str(source.folder))
    params: dict = {}
    for rule in rules:
        want = tuple(expected_shapes[rule.flax_path])
        hf_shape = source.shape(rule.hf_name)
        if rule.flax_shape(hf_shape) != want:
            raise CheckpointError(
                f"{source.folder}: tensor {rule.hf_name} has shape {hf_shape}, which does not "
                f"fit the config (Flax {'/'.join(rule.flax_path)} expects {want})"
            )

        def block(
            index: tuple[slice, ...],
            rule: TensorRule = rule,
            want: tuple = want,
            cache: dict = {},  # noqa: B006 - per parameter: a new default each loop turn
        ) -> Any:
            key = tuple(sl.indices(n) for sl, n in zip(index, want))
            if key not in cache:  # replicated parameters: one read for all local devices
                read = lambda sl: source.read(rule.hf_name, sl)
                cache[key] = read_block(read, rule, want, index).astype(dtype)
            return cache[key]

        sharding = _get_path(shardings, rule.flax_path)
        _set_path(params, rule.flax_path, jax.make_array_from_callback(want, sharding, block))
    return params


def _check_names(
    names: Iterable[str], rules: list[TensorRule], ignore: Iterable[str], source: str
) -> None:
    names = set(names)
    ignore_re = [re.compile(p) for p in ignore]
    wanted = {r.hf_name for r in rules}
    missing = [r.hf_name for r in rules if r.hf_name not in names]
    unexpected = [k for k in names if k not in wanted and not any(p.search(k) for p in ignore_re)]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]} (of {len(missing)})")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {sorted(unexpected)[:8]} (of {len(unexpected)})"
        )


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, read with `weights_only=True` (no code runs from the file)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch pickle and torch is not installed. Convert it once to "
            "safetensors (e.g. `transformers` `model.save_pretrained(dir, "
            "safe_serialization=True)`) or install torch."
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _torch_to_numpy(v) for k, v in state.items()}


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@dataclass(frozen=True)
class TensorRule:
    """One HF tensor ↔ one Flax parameter: flax = reshape(transpose?(hf), shape).

    `groups` says which Flax dimensions each (transposed) HF dimension was split into, e.g.
    an attention query kernel HF [H·D, E] → [E, H·D] → Flax [E, H, D] has groups
    ((0,), (1, 2)). Any block of the Flax parameter is then read from a block of HF rows and
    columns (`read_block`), so a host loads only the slices its devices hold.
    """

    hf_name: str
    flax_path: tuple[str, ...]
    transpose: bool = False
    shape: tuple[int, ...] | None = None  # the Flax shape when it splits HF dimensions
    groups: tuple[tuple[int, ...], ...] | None = None

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        x = x.T if self.transpose else x
        return x.reshape(self.shape) if self.shape is not None else x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.groups is not None:
            x = x.reshape(tuple(math.prod(x.shape[i] for i in g) for g in self.groups))
        return x.T if self.transpose else x

    def flax_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The Flax shape of an HF tensor of `hf_shape` (None if they cannot match)."""
        t_shape = tuple(hf_shape[::-1]) if self.transpose else tuple(hf_shape)
        if self.shape is None:
            return t_shape
        return self.shape if math.prod(self.shape) == math.prod(t_shape) else None

    def block_groups(self, rank: int) -> tuple[tuple[int, ...], ...]:
        return self.groups if self.groups is not None else tuple((i,) for i in range(rank))


def read_block(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    rule: TensorRule,
    flax_shape: tuple[int, ...],
    index: tuple[slice, ...],
) -> np.ndarray:
    """The block `index` of a Flax parameter, reading only the HF rows/columns it needs.

    `read(hf_slices)` returns that block of the HF tensor. Per HF dimension, the outermost
    Flax dimension of its group selects a contiguous range; inner dimensions are read whole
    and cut afterwards (they are never sharded in practice).
    """
    index = tuple(index) + (slice(None),) * (len(flax_shape) - len(index))
    bounds = [sl.indices(n)[:2] for sl, n in zip(index, flax_shape)]
    groups = rule.block_groups(len(flax_shape))
    t_slices, block_shape = [], []
    for g in groups:
        inner = math.prod(flax_shape[i] for i in g[1:])
        lo, hi = bounds[g[0]]
        t_slices.append(slice(lo * inner, hi * inner))
        block_shape += [hi - lo] + [flax_shape[i] for i in g[1:]]
    hf_slices = tuple(t_slices[::-1]) if rule.transpose else tuple(t_slices)
    part = np.asarray(read(hf_slices))
    part = part.T if rule.transpose else part
    part = part.reshape(block_shape)
    inner_cut = tuple(slice(None) if i == g[0] else slice(*bounds[i]) for g in groups for i in g)
    return part[inner_cut]


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def tensors_to_params(
    tensors: Mapping[str, np.ndarray],
    rules: Iterable[TensorRule],
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    dtype: Any = np.float32,
) -> dict:
    """Builds a Flax params tree; every missing, unexpected or mis-shaped tensor is an error."""
    rules = list(rules)
    _check_names(tensors, rules, ignore, source)
    params: dict = {}
    for rule in rules:
        value = np.asarray(rule.to_flax(np.asarray(tensors[rule.hf_name])))
        want = tuple(expected_shapes[rule.flax_path])
        if value.shape != want:
            raise CheckpointError(
                f"{source}: tensor {rule.hf_name} has shape {tuple(tensors[rule.hf_name].shape)}, "
                f"which does not fit the config (Flax {'/'.join(rule.flax_path)} expects {want})"
            )
        _set_path(params, rule.flax_path, value.astype(dtype))
    return params


def params_to_tensors(params: Mapping, rules: Iterable[TensorRule]) -> dict[str, np.ndarray]:
    out = {}
    for rule in rules:
        value = np.asarray(_get_path(params, rule.flax_path), dtype=np.float32)
        out[rule.hf_name] = np.ascontiguousarray(rule.to_hf(value))
    return out


def flat_shapes(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out


def write_checkpoint(
    folder: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    # safetensors writes a numpy array's buffer as is: strided views must be made contiguous.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
