"""The FSDP teacher runs one gathered layer at a time (jaxret.teachers.layerwise): same scores
as PyTorch, and — compiled at T0-3B widths — temporary memory that does not grow with the
number of layers while the per-device FLOPs stay 1/8 of the total."""

import jax
import numpy as np
import pytest
from test_t5_teacher import PASSAGES, QUESTIONS, torch_mean_loglik

from jaxret.models.hf_t5 import abstract_params
from jaxret.models.t5 import T5Config
from jaxret.parallel import make_mesh
from jaxret.parallel.compiled import program
from jaxret.teachers.t5_teacher import T5Teacher, TeacherSpec, compile_scoring


@pytest.mark.parametrize("strategy,mesh_shape", [("fsdp", (8, 1)), ("fsdp_tensor", (4, 2))])
def test_layerwise_teacher_equals_pytorch(tiny_t5, strategy, mesh_shape):
    """6 pairs over 8 (or 4) devices, one pair per device per chunk: padded rows and several
    chunks per layer. Fails if a chunk attends to padding (drop `_mask_bias(mc)` in the
    encoder layer), if a decoder chunk reads another chunk's passages (pass `encoded` rows in
    another order), or if the decoder's causal mask is lost."""
    mesh = make_mesh(("data", "model"), mesh_shape)
    spec = TeacherSpec(max_passage_length=48, max_question_length=24, chunk_pairs=1)
    teacher = T5Teacher.from_pretrained(tiny_t5, "float32", spec, mesh, strategy)
    assert teacher.layerwise
    layers = teacher.params["encoder"]["layers"]["self_attention"]["q"]["kernel"]
    assert layers.shape[0] == teacher.config.num_layers  # stacked, one slice per layer
    assert "data" in layers.sharding.spec  # each device holds 1/4 or 1/8 of every layer
    ours = teacher.score(QUESTIONS, PASSAGES)
    np.testing.assert_allclose(ours, torch_mean_loglik(tiny_t5, teacher), atol=1e-4)


def t0_3b(layers: int) -> T5Config:
    """bigscience/T0_3B's config.json widths with `layers` per stack."""
    return T5Config(
        vocab_size=32128,
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_heads=32,
        num_layers=layers,
        num_decoder_layers=layers,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        scale_decoder_outputs=False,
    )


def test_fsdp_teacher_memory_is_one_layer_at_t0_3b_widths():
    """Compiled (never run) on 8 devices, 16 pairs per device of 512 + 128 tokens in chunks
    of 4, fp32 (XLA:CPU turns bf16 weights it multiplies into an fp32 copy of the whole stack
    before the loop — a CPU-compiler effect, see benchmarks/memory.py — so fp32 shows what a
    bf16-native GPU/TPU compiler allocates). From 2 to 8 layers per stack, each added layer
    adds its 1/8 share of arguments and no temporary memory. The whole-model pass (today's
    before this change, `layerwise_pass=False`) is the mutation: its temporaries grow by every
    added layer's full weights, and this test's first assertion fails on it."""
    mesh = make_mesh(("data", "model"), (8, 1))
    spec = TeacherSpec(max_passage_length=512, max_question_length=128, chunk_pairs=4)
    pairs = 8 * 16

    def memory(layers, layerwise_pass=None):
        m = compile_scoring(t0_3b(layers), mesh, "fsdp", pairs, spec, "float32", layerwise_pass)
        m = m.memory_analysis()
        return m.argument_size_in_bytes, m.temp_size_in_bytes

    def layer_bytes(layers):  # fp32 bytes of the layer weights, both stacks
        flat = jax.tree_util.tree_leaves_with_path(abstract_params(t0_3b(layers)))
        return sum(4 * x.size for p, x in flat if "layer_" in jax.tree_util.keystr(p))

    added = layer_bytes(8) - layer_bytes(2)  # 6 layers per stack: 2.7 GB
    (args2, temp2), (args4, temp4), (args8, temp8) = (memory(n) for n in (2, 4, 8))
    assert temp8 - temp2 < 0.01 * added, (temp2, temp4, temp8)
    assert temp4 - temp2 < 0.01 * added
    np.testing.assert_allclose(args8 - args2, added / 8, rtol=0.01)
    # The whole-model pass holds every gathered layer at once.
    _, whole2 = memory(2, layerwise_pass=False)
    _, whole4 = memory(4, layerwise_pass=False)
    assert whole4 - whole2 > 0.9 * (layer_bytes(4) - layer_bytes(2))


def test_fsdp_teacher_flops_divide_over_devices_at_t0_3b_widths():
    """Per-device matmul FLOPs (loops × their trip counts) = the one-device program's / 8,
    and every layer's weights are gathered inside the layer loop (one all-gather per weight
    per layer). Fails if the pairs were not split over the devices (e.g. `map_rows` over all
    rows with `axes=()`), and if the gathers were hoisted out of the loop (the stacked layers
    constrained to replicated before the scan: 20 gathers instead of ≥ 72)."""
    spec = TeacherSpec(max_passage_length=512, max_question_length=128, chunk_pairs=4)
    one = make_mesh(("data", "model"), (1, 1), devices=jax.devices()[:1])
    eight = make_mesh(("data", "model"), (8, 1))
    cfg = t0_3b(4)
    single = program(compile_scoring(cfg, one, "fsdp", 8 * 4, spec, "float32"))
    per_device = program(compile_scoring(cfg, eight, "fsdp", 8 * 4, spec, "float32"))
    # Same chunk count in both: 4 pairs per device per chunk, 1 chunk per layer on 8 devices.
    ratio = per_device.dot_flops() / single.dot_flops()
    assert abs(ratio - 1 / 8) < 0.01 * (1 / 8), ratio
    gathers = [c for c in per_device.collectives() if c.op == "all-gather"]
    # Encoder layer: q k v o wi_0 wi_1 wo; decoder layer: 4 more (cross-attention).
    assert sum(c.count for c in gathers) >= cfg.num_layers * (7 + 11)
