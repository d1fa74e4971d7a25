import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxret.data.tokenization import load_tokenizer, tokenize_queries
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, make_mesh, param_shardings, shard_params
from jaxret.parallel.mesh import resolve_shape


def test_eight_fake_devices_present():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def test_resolve_shape():
    assert resolve_shape((-1, 2), 8) == (4, 2)
    assert resolve_shape((8,), 8) == (8,)
    with pytest.raises(ValueError, match="does not divide"):
        resolve_shape((-1, 3), 8)
    with pytest.raises(ValueError, match="at most one"):
        resolve_shape((-1, -1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        resolve_shape((2, 2), 8)


@pytest.fixture(scope="module")
def encoder_and_tokens(tiny_bert):
    enc, params, tok_folder = de.from_pretrained(tiny_bert, de.EncoderSpec(pooling="mean"))
    texts = [f"query number {i} about topic {i % 3}" for i in range(16)]
    return enc, params, tokenize_queries(load_tokenizer(tok_folder), texts, 16)


@pytest.mark.parametrize(
    "mesh_shape,strategy",
    [((8, 1), "replicated"), ((8, 1), "fsdp"), ((2, 4), "tensor"), ((4, 2), "fsdp_tensor")],
)
def test_sharded_encoder_equals_single_device(encoder_and_tokens, mesh_shape, strategy):
    enc, params, tokens = encoder_and_tokens
    single = np.asarray(jax.jit(lambda p, t: enc.embed(p, "query", t))(params, tokens))

    mesh = make_mesh(("data", "model"), mesh_shape)
    shardings = param_shardings(params, mesh, strategy)
    sharded_params = shard_params(params, mesh, strategy)
    batch = global_batch(tokens, mesh, P("data"))
    fn = jax.jit(
        lambda p, t: enc.embed(p, "query", t),
        in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, batch)),
        out_shardings=jax.sharding.NamedSharding(mesh, P("data")),
    )
    out = fn(sharded_params, batch)
    assert out.sharding.spec == P("data")
    np.testing.assert_allclose(np.asarray(out), single, atol=2e-6)

    specs = [s.spec for s in jax.tree.leaves(shardings)]
    if strategy == "replicated":
        assert all(all(a is None for a in s) for s in specs)
    else:
        assert any(any(a is not None for a in s) for s in specs), "sharded nothing"
    if strategy in ("tensor", "fsdp_tensor"):
        q = shardings["shared"]["layer_0"]["attention"]["query"]["kernel"].spec
        assert q[1] == "model"


def test_non_divisible_dims_stay_replicated(encoder_and_tokens):
    _, params, _ = encoder_and_tokens
    mesh = make_mesh(("data", "model"), (1, 8))
    shardings = param_shardings(params, mesh, "tensor")
    # 4 heads cannot split over 8 devices; the 64-wide MLP can.
    assert shardings["shared"]["layer_0"]["attention"]["query"]["kernel"].spec == P(
        None, None, None
    )
    assert shardings["shared"]["layer_0"]["intermediate"]["kernel"].spec == P(None, "model")


def test_unknown_strategy(encoder_and_tokens):
    _, params, _ = encoder_and_tokens
    with pytest.raises(ValueError, match="zero3"):
        param_shardings(params, make_mesh(), "zero3")
