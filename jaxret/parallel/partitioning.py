"""Logical parameter axes → mesh axes.

Each parameter gets logical axis names from its path (e.g. an attention query kernel is
("embed", "heads", "kv")); a strategy maps logical names to mesh axes:

  replicated    every parameter on every device
  fsdp          "embed" sharded over "data" (ZeRO-3 style: gathered per layer by XLA)
  tensor        heads / mlp / vocab sharded over "model" (Megatron-style)
  fsdp_tensor   both

A dimension that the mesh axis does not divide stays replicated, so one rule set serves
every model size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (path regex, logical axes). First match wins; paths are "/"-joined Flax param paths.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # BERT
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"(position|token_type)_embeddings/embedding$", (None, "embed")),
    (r"attention/(query|key|value)/kernel$", ("embed", "heads", "kv")),
    (r"attention/(query|key|value)/bias$", ("heads", "kv")),
    (r"attention/output/kernel$", ("heads", "kv", "embed")),
    (r"intermediate/kernel$", ("embed", "mlp")),
    (r"intermediate/bias$", ("mlp",)),
    (r"layer_\d+/output/kernel$", ("mlp", "embed")),
    (r"pooler/kernel$", ("embed", None)),
    (r"projection/kernel$", ("embed", None)),  # dual encoder's own dense_tanh head
    # T5
    (r"shared/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"relative_attention_bias/embedding$", (None, "heads")),
    (r"(self_attention|cross_attention)/(q|k|v)/kernel$", ("embed", "heads", "kv")),
    (r"(self_attention|cross_attention)/o/kernel$", ("heads", "kv", "embed")),
    (r"mlp/(wi|wi_0|wi_1)/kernel$", ("embed", "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    # BART
    (r"(self_attn|encoder_attn)/(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads", "kv")),
    (r"(self_attn|encoder_attn)/(q_proj|k_proj|v_proj)/bias$", ("heads", "kv")),
    (r"(self_attn|encoder_attn)/out_proj/kernel$", ("heads", "kv", "embed")),
    (r"ffn/fc1/kernel$", ("embed", "mlp")),
    (r"ffn/fc1/bias$", ("mlp",)),
    (r"ffn/fc2/kernel$", ("mlp", "embed")),
    (r"(encoder|decoder)_positions/embedding$", (None, "embed")),
    (r"final_logits_bias$", ("vocab",)),
)

STRATEGIES: dict[str, dict[str, str]] = {
    "replicated": {},
    "fsdp": {"embed": "data"},
    "tensor": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tensor": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(params: Any) -> Any:
    """A tree like `params` of logical-axis tuples (None entries = no logical name)."""

    def axes_of(path: Sequence[Any], leaf: Any) -> tuple[str | None, ...]:
        name = _path_str(path)
        for pattern, axes in PARAM_AXES:
            if re.search(pattern, name):
                if len(axes) != len(leaf.shape):
                    raise ValueError(f"{name}: rule {axes} does not fit shape {leaf.shape}")
                return axes
        return (None,) * len(leaf.shape)

    return jax.tree_util.tree_map_with_path(axes_of, params)


def spec_for(
    axes: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, str], mesh: Mesh
) -> PartitionSpec:
    used: set[str] = set()
    out: list[str | None] = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape:
            out.append(None)
            continue
        if mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]:
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(params: Any, mesh: Mesh, strategy: str = "replicated") -> Any:
    """NamedShardings for every parameter (works on arrays or ShapeDtypeStructs)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"param sharding {strategy!r}; known: {sorted(STRATEGIES)}")
    rules = STRATEGIES[strategy]
    axes_tree = logical_axes(params)
    return jax.tree.map(
        lambda leaf, axes: NamedSharding(mesh, spec_for(axes, leaf.shape, rules, mesh)),
        params,
        axes_tree,
        # Plain tuples only: optax's EmptyState is an empty NamedTuple, not an axes tuple.
        is_leaf=lambda x: type(x) is tuple and all(a is None or isinstance(a, str) for a in x),
    )


def shard_params(params: Any, mesh: Mesh, strategy: str = "replicated") -> Any:
    return jax.device_put(params, param_shardings(params, mesh, strategy))
