import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxret.models.generate import Decoding, best_of, filter_logits, generate
from jaxret.models.hf_io import CheckpointError
from jaxret.models.hf_t5 import abstract_params, load_t5, save_t5
from jaxret.models.t5 import T5, T5Config, relative_position_bucket, shift_right
from jaxret.parallel import make_mesh, shard_params


def padded_batch(vocab):
    r = np.random.RandomState(0)
    ids = r.randint(3, vocab, (3, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 4:] = 0
    labels = r.randint(3, vocab, (3, 9)).astype(np.int32)
    dmask = np.ones_like(labels)
    dmask[0, 5:] = 0
    return ids, mask, labels, dmask


def torch_logits(folder, ids, mask, dec, dmask):
    m = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return m(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dmask),
        ).logits.numpy()


def test_parity_fp32_padding_both_sides(tiny_t5):
    cfg, params, _ = load_t5(tiny_t5)
    ids, mask, labels, dmask = padded_batch(cfg.vocab_size)
    dec = np.asarray(shift_right(jnp.asarray(labels)))
    ref = torch_logits(tiny_t5, ids, mask, dec, dmask)
    ours = np.asarray(jax.jit(T5(cfg).apply)({"params": params}, ids, mask, dec, dmask))
    valid = dmask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4


def test_families_detected(tiny_t5):
    cfg, params, _ = load_t5(tiny_t5)
    gated = "gated" in tiny_t5.name
    assert cfg.gated == gated and cfg.tie_word_embeddings == (not gated)
    assert cfg.scale_decoder_outputs == (not gated) and ("lm_head" in params) == gated


def test_export_round_trip_through_pytorch(tiny_t5, tmp_path):
    cfg, params, _ = load_t5(tiny_t5)
    save_t5(tmp_path / "out", cfg, params)
    ids, mask, labels, dmask = padded_batch(cfg.vocab_size)
    dec = np.asarray(shift_right(jnp.asarray(labels)))
    a = torch_logits(tiny_t5, ids, mask, dec, dmask)
    b = torch_logits(tmp_path / "out", ids, mask, dec, dmask)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional, 32, 128
        ).numpy()
        ours = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128))
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize(
    "name,params_b", [("T0_3B", 2.85), ("t5-xl-lm-adapt", 2.85), ("t5-xxl-lm-adapt", 11.1)]
)
def test_large_configs_load(name, params_b):
    """The config.json fields of bigscience/T0_3B and google/t5-{xl,xxl}-lm-adapt."""
    big = {
        "T0_3B": (2048, 5120, 24, 32),
        "t5-xl-lm-adapt": (2048, 5120, 24, 32),
        "t5-xxl-lm-adapt": (4096, 10240, 24, 64),
    }[name]
    d = {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "d_model": big[0],
        "d_ff": big[1],
        "num_layers": big[2],
        "num_decoder_layers": big[2],
        "num_heads": big[3],
        "d_kv": 64,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    cfg = T5Config.from_hf_dict(d)
    assert cfg.gated and not cfg.tie_word_embeddings and cfg.relative_attention_max_distance == 128
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    assert abs(n / 1e9 - params_b) < 0.1


def test_bad_checkpoints(tiny_t5, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "bad"
    shutil.copytree(tiny_t5, folder)
    t = load_file(str(folder / "model.safetensors"))
    del t["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.block.2.layer.1.EncDecAttention.k.weight"):
        load_t5(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_t5(folder)  # read through torch.load(weights_only=True), then checked
    cfg = json.loads((folder / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-swish"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gated-swish"):
        load_t5(folder)


@pytest.mark.parametrize("mesh_shape", [(4, 2), (8, 1)])
def test_sharded_equals_unsharded(tiny_t5, mesh_shape):
    cfg, params, _ = load_t5(tiny_t5)
    ids, mask, labels, dmask = padded_batch(cfg.vocab_size)
    dec = np.asarray(shift_right(jnp.asarray(labels)))
    fn = jax.jit(T5(cfg).apply)
    ref = np.asarray(fn({"params": params}, ids, mask, dec, dmask))
    mesh = make_mesh(("data", "model"), mesh_shape)
    sharded = shard_params(params, mesh, "fsdp_tensor")
    out = np.asarray(fn({"params": sharded}, ids, mask, dec, dmask))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
    assert any("model" in s for s in specs) == (mesh_shape[1] > 1)
    assert any("data" in s for s in specs)


def test_greedy_equals_transformers_generate(tiny_t5):
    cfg, params, _ = load_t5(tiny_t5)
    ids, mask, _, _ = padded_batch(cfg.vocab_size)
    m = transformers.T5ForConditionalGeneration.from_pretrained(str(tiny_t5)).eval()
    with torch.no_grad():
        ref = m.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=12,
            min_new_tokens=0,
            num_beams=1,
            use_cache=False,
        ).numpy()[:, 1:]  # its cache breaks with 2 enc / 3 dec layers
    seqs, _, _ = generate(
        T5(cfg), params, ids, mask, jax.random.key(0), Decoding(max_new_tokens=12)
    )
    ours = np.asarray(seqs)[:, 0, : ref.shape[1]]
    np.testing.assert_array_equal(ours, ref)


def test_sampling_determinism(tiny_t5):
    cfg, params, _ = load_t5(tiny_t5)
    ids, mask, _, _ = padded_batch(cfg.vocab_size)
    model = T5(cfg)
    d = Decoding("sample", max_new_tokens=10, num_return=4, top_p=0.95, temperature=1.3)
    a = generate(model, params, ids, mask, jax.random.key(3), d)
    c = generate(model, params, ids, mask, jax.random.key(3), d)
    e = generate(model, params, ids, mask, jax.random.key(4), d)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(e[0]))
    g = generate(
        model, params, ids, mask, jax.random.key(0), Decoding("sample", max_new_tokens=10, top_k=5)
    )
    assert g[0].shape == (3, 1, 10)
    # Per-row seeds: a row's samples do not depend on the rest of its batch.
    seeds = jnp.array([11, 12, 13])
    full = generate(model, params, ids, mask, jax.random.key(3), d, seeds)
    alone = generate(model, params, ids[1:2], mask[1:2], jax.random.key(3), d, seeds[1:2])
    np.testing.assert_array_equal(np.asarray(full[0])[1], np.asarray(alone[0])[0])


def test_returned_loglik_equals_teacher_forced_rescoring(tiny_t5):
    cfg, params, _ = load_t5(tiny_t5)
    ids, mask, _, _ = padded_batch(cfg.vocab_size)
    seqs, ll, _ = generate(
        T5(cfg),
        params,
        ids,
        mask,
        jax.random.key(1),
        Decoding("sample", max_new_tokens=10, num_return=3, top_k=20),
    )
    seqs = np.asarray(seqs).reshape(9, 10)
    # EOS included; tokens after EOS are padding and do not count.
    eos_seen = np.cumsum(seqs == cfg.eos_token_id, axis=1)
    valid = (eos_seen == 0) | ((eos_seen == 1) & (seqs == cfg.eos_token_id))
    logits = T5(cfg).apply(
        {"params": params},
        np.repeat(ids, 3, 0),
        np.repeat(mask, 3, 0),
        np.asarray(shift_right(jnp.asarray(seqs))),
    )
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    gold = np.take_along_axis(logp, seqs[..., None], -1)[..., 0]
    np.testing.assert_allclose((gold * valid).sum(1), np.asarray(ll).reshape(9), atol=1e-4)
    top, top_ll = best_of(jnp.asarray(seqs.reshape(3, 3, 10)), ll, 2)
    assert top.shape == (3, 2, 10) and (np.diff(np.asarray(top_ll), axis=1) <= 0).all()


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.75)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]


def test_bf16_logits_accumulate_in_fp32(tiny_t5):
    """Tied and untied heads alike: logits = fp32 accumulation of the bf16 hidden state times
    the bf16 table, not a bf16-rounded product."""
    cfg, params, _ = load_t5(tiny_t5, dtype="bfloat16")
    model = T5(cfg, dtype=jnp.bfloat16)
    hidden = jnp.asarray(np.random.RandomState(0).randn(4, cfg.d_model), jnp.bfloat16)
    logits = model.apply({"params": params}, hidden, method=T5.logits)
    assert logits.dtype == jnp.float32
    h = np.asarray(hidden, np.float64)
    if cfg.scale_decoder_outputs:
        h = np.asarray(jnp.asarray(hidden * cfg.d_model**-0.5, jnp.bfloat16), np.float64)
    table = (
        params["shared"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    )
    exact = h @ np.asarray(table, np.float64)
    # fp32 accumulation: ~1e-6 relative; a bf16 output would be off by up to 2^-9 relative.
    np.testing.assert_allclose(
        np.asarray(logits), exact, rtol=2e-5, atol=2e-5 * np.abs(exact).max()
    )


@pytest.mark.parametrize(
    "strategy,shape", [("fsdp", (8, 1)), ("tensor", (2, 4)), ("fsdp_tensor", (4, 2))]
)
def test_sharded_load_reads_only_device_blocks(tiny_t5, strategy, shape, monkeypatch):
    """Every parameter is placed with make_array_from_callback from blocks of the
    safetensors: the values equal a full load, and a sharded parameter is never read whole."""
    from jaxret.models import hf_io
    from jaxret.models.hf_t5 import load_t5_sharded

    reads = []
    original = hf_io.TensorSource.read

    def read(self, name, block=None):
        out = original(self, name, block)
        reads.append((name, out.size, math.prod(self.shape(name))))
        return out

    monkeypatch.setattr(hf_io.TensorSource, "read", read)
    mesh = make_mesh(("data", "model"), shape)
    cfg, sharded, _ = load_t5_sharded(tiny_t5, "float32", mesh, strategy)
    _, full, _ = load_t5(tiny_t5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, full)
    specs = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded)
    }
    sharded_names = [n for n, spec in specs.items() if any(a is not None for a in spec)]
    assert sharded_names  # the strategy splits something
    # Only unsplit parameters are read whole (and the embedding, in 4096-row blocks, by the
    # check that tells a tied lm_head from an untied one: this tiny vocabulary is one block).
    whole_reads = {name for name, size, total in reads if size == total}
    whole_reads -= {"shared.weight", "lm_head.weight"}
    assert not whole_reads & {
        r.hf_name for r in _t5_rules(cfg) if "/".join(r.flax_path) in sharded_names
    }


def _t5_rules(cfg):
    from jaxret.models.hf_t5 import _rules

    return _rules(cfg)


def test_read_block_equals_slicing_the_converted_tensor():
    from jaxret.models.hf_io import TensorRule, read_block

    r = np.random.RandomState(0)
    cases = [
        (TensorRule("q", ("q",), True, (6, 2, 3), ((0,), (1, 2))), (6, 6)),  # [H·D, E] → [E, H, D]
        (TensorRule("o", ("o",), True, (2, 3, 6), ((0, 1), (2,))), (6, 6)),  # [E, H·D] → [H, D, E]
        (TensorRule("b", ("b",), False, (2, 3), ((0, 1),)), (6,)),  # [H·D] → [H, D]
        (TensorRule("w", ("w",), True), (5, 4)),
        (TensorRule("e", ("e",)), (7, 4)),
    ]
    for rule, hf_shape in cases:
        hf = r.randn(*hf_shape)
        flax = rule.to_flax(hf)
        np.testing.assert_array_equal(rule.to_hf(flax), hf)
        for _ in range(20):
            index = tuple(
                slice(a, a + r.randint(1, n - a + 1)) for n in flax.shape for a in [r.randint(0, n)]
            )
            got = read_block(lambda sl, hf=hf: hf[sl], rule, flax.shape, index)
            np.testing.assert_array_equal(got, flax[index])
