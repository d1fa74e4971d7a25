"""The T5 teacher's scoring pass one layer at a time: an FSDP teacher whose peak memory is one
gathered layer.

Under FSDP every device holds 1/D of each weight. Run as one Flax module, XLA gathers every
weight once per step — before the loop over pair chunks, since the gather is loop-invariant —
so the whole teacher sits on every device (T5-XXL: 22 GB bf16) and FSDP saves no peak memory.

Here the layers' weights are stacked ([L, ...], `stack_layers`, done once at load) and a scan
over the layers gathers one layer inside its body. All of a device's pairs pass through that
layer, `chunk` pairs per device at a time (which bounds the [chunk, H, L, L] attention scores),
before the next layer is gathered. The teacher needs no gradient, so the only state is the
activations of all pairs: [N, Lp, D] through the encoder, then [N, Lq, D] through the decoder
(plus the encoder output it attends to). The layer math is the Flax modules' own
(`models.t5.EncoderLayer` / `DecoderLayer`), applied to each gathered layer.

Weights are gathered over the "data" axis only: under `fsdp_tensor` a layer stays split over
"model" as tensor parallelism wants.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.models.t5 import (
    T5,
    DecoderLayer,
    EncoderLayer,
    RelativeBias,
    RMSNorm,
    T5Config,
    _mask_bias,
    shift_right,
)
from jaxret.parallel.activations import Activations, map_rows, pad_rows
from jaxret.parallel.partitioning import param_shardings

STACKS = ("encoder", "decoder")


def uses_layerwise(strategy: str) -> bool:
    """Whether a teacher sharded by `strategy` runs layer by layer (FSDP layouts)."""
    return strategy in ("fsdp", "fsdp_tensor")


def _gathered_strategy(strategy: str) -> str:
    """The layout of one layer inside the scan: FSDP's "data" split undone, "model" kept."""
    return {"fsdp": "replicated", "fsdp_tensor": "tensor"}.get(strategy, strategy)


def _layer_names(cfg: T5Config, stack: str) -> list[str]:
    n = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
    return [f"layer_{i}" for i in range(n)]


def stack_layers(params: dict, cfg: T5Config) -> dict:
    """T5 params → the same tree with each stack's `layer_i` subtrees stacked into `layers`
    ([L, ...] leaves). Works on arrays (host or device) and ShapeDtypeStructs."""
    out = {k: v for k, v in params.items() if k not in STACKS}
    for stack in STACKS:
        layers = [params[stack][name] for name in _layer_names(cfg, stack)]
        rest = {k: v for k, v in params[stack].items() if not k.startswith("layer_")}
        if isinstance(jax.tree.leaves(layers[0])[0], jax.ShapeDtypeStruct):
            stacked = jax.tree.map(
                lambda *xs: jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype), *layers
            )
        else:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        out[stack] = {**rest, "layers": stacked}
    return out


def stacked_shardings(stacked: dict, mesh: Mesh, strategy: str) -> dict:
    """Shardings of `stack_layers`'s tree: each layer as `strategy` places it, the layer axis
    whole (every device holds its 1/D of every layer)."""
    out = {}
    for key, sub in stacked.items():
        if key not in STACKS:  # rules match "/"-joined paths: keep the top-level name
            out[key] = param_shardings({key: sub}, mesh, strategy)[key]
            continue
        rest = {k: v for k, v in sub.items() if k != "layers"}
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), sub["layers"])
        per_layer = param_shardings({"layer_0": one}, mesh, strategy)["layer_0"]
        layers = jax.tree.map(
            lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)), per_layer
        )
        out[key] = {**param_shardings({key: rest}, mesh, strategy)[key], "layers": layers}
    return out


def place_stacked(params: dict, cfg: T5Config, mesh: Mesh, strategy: str) -> dict:
    """Sharded T5 params (`layer_i` subtrees) → stacked and sharded for the layerwise pass.
    One weight at a time, so the transient copy is one weight across the layers."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    targets = stacked_shardings(stack_layers(abstract, cfg), mesh, strategy)
    out = {k: v for k, v in params.items() if k not in STACKS}
    for stack in STACKS:
        layers = [params[stack][name] for name in _layer_names(cfg, stack)]
        treedef = jax.tree.structure(layers[0])
        per_layer = [jax.tree.leaves(layer) for layer in layers]
        leaves = [
            jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target)(*parts)
            for parts, target in zip(zip(*per_layer), jax.tree.leaves(targets[stack]["layers"]))
        ]
        rest = {k: v for k, v in params[stack].items() if not k.startswith("layer_")}
        out[stack] = {**rest, "layers": jax.tree.unflatten(treedef, leaves)}
    return out


def token_logprobs(
    cfg: T5Config,
    dtype: Any,
    act: Activations,
    strategy: str,
    params: dict,  # stack_layers(...) tree, sharded by stacked_shardings(..., strategy)
    input_ids: jax.Array,  # [N, Lp]
    attention_mask: jax.Array,  # [N, Lp]
    labels: jax.Array,  # [N, Lq]
    chunk: int = 0,  # pairs per device per chunk; 0 = all of a device's pairs at once
) -> jax.Array:
    """log p(label_t | label_<t, passage) → [N, Lq] fp32, as `t5_teacher.token_logprobs`."""
    mesh, axes = act.mesh, act.batch
    devices = math.prod(mesh.shape[a] for a in axes)
    n = input_ids.shape[0]
    per_device = -(-n // devices) if chunk <= 0 else chunk
    ids, mask, lab = (
        pad_rows(x, devices * per_device) for x in (input_ids, attention_mask, labels)
    )
    whole = _gathered_strategy(strategy)

    def gather(tree: Any) -> Any:  # this device's share → the layer as the step uses it
        return jax.lax.with_sharding_constraint(tree, param_shardings(tree, mesh, whole))

    def gather_layer(layer: Any) -> Any:
        # The barrier pins this layer's slice inside the loop: without it XLA:CPU hoists the
        # bf16→f32 convert of its dots out of the loop, over the whole stacked teacher.
        return gather(jax.lax.optimization_barrier(layer))

    def rows(fn: Any, *arrays: jax.Array) -> jax.Array:
        return map_rows(lambda a: fn(*a), arrays, mesh, axes, per_device)

    top = {k: v for k, v in params.items() if k not in STACKS}
    top = gather(top)  # the embedding table (and untied lm_head): one layer's worth
    model = T5(cfg, dtype=dtype, act=act)
    embed = lambda x: model.apply({"params": top}, x, method=T5.embed)
    batch_rows = lambda x: act.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    # Encoder: [N, Lp, D] through every layer.
    enc = params["encoder"]
    pos = jnp.arange(ids.shape[1])
    pos_bias = RelativeBias(cfg, True).apply(
        {"params": gather(enc["relative_bias"])}, pos, pos
    )  # [1, H, Lp, Lp] fp32, shared by the layers
    x = batch_rows(embed(ids))

    def encoder_layer(x: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        w = {"params": gather_layer(layer)}

        def one(xc: jax.Array, mc: jax.Array) -> jax.Array:
            return EncoderLayer(cfg, dtype, act).apply(w, xc, pos_bias + _mask_bias(mc), True)

        return rows(one, x, mask), None

    x, _ = jax.lax.scan(encoder_layer, x, enc["layers"])
    final = lambda p, h: RMSNorm(cfg.layer_norm_epsilon, dtype).apply({"params": p}, h)
    encoded = rows(lambda h: final(gather(enc["final_norm"]), h), x)

    # Decoder: [N, Lq, D] through every layer, each chunk attending to its pairs' passages.
    dec = params["decoder"]
    q_pos = jnp.arange(lab.shape[1])
    causal = jnp.where(q_pos[None, :] <= q_pos[:, None], 0.0, jnp.finfo(jnp.float32).min)
    self_bias = (
        RelativeBias(cfg, False).apply({"params": gather(dec["relative_bias"])}, q_pos, q_pos)
        + causal[None, None]
    )
    y = batch_rows(embed(shift_right(lab, cfg.decoder_start_token_id, cfg.pad_token_id)))

    def decoder_layer(y: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        w = {"params": gather_layer(layer)}

        def one(yc: jax.Array, ec: jax.Array, mc: jax.Array) -> jax.Array:
            def run(m: DecoderLayer) -> jax.Array:
                return m(yc, self_bias, _mask_bias(mc), m.cross_kv(ec), True)[0]

            return DecoderLayer(cfg, dtype, act).apply(w, method=run)

        return rows(one, y, encoded, mask), None

    y, _ = jax.lax.scan(decoder_layer, y, dec["layers"])
    dec_norm = gather(dec["final_norm"])

    def gold_logprobs(yc: jax.Array, lc: jax.Array) -> jax.Array:
        logits = model.apply({"params": top}, final(dec_norm, yc), method=T5.logits)
        gold = jnp.take_along_axis(logits, lc[..., None], axis=-1)[..., 0]
        return gold - jax.nn.logsumexp(logits, axis=-1)  # [chunk, Lq]

    return rows(gold_logprobs, y, lab)[:n]
