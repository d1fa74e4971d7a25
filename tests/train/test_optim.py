"""Weight decay as Megatron's `get_params_for_weight_decay_optimization`: not on LayerNorm
parameters and biases; on kernels and embeddings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxret.models import dual_encoder as de
from jaxret.train.optim import decay_mask, make_optimizer


def _paths(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_mask_on_the_real_minilm_tree(minilm):
    _, params, _ = de.from_pretrained(minilm, de.EncoderSpec(pooling="mean"))
    mask = _paths(decay_mask(params))
    decayed = {p for p, m in mask.items() if m}
    kept = {p for p, m in mask.items() if not m}
    # MiniLM-L6: 6 layers × (4 biases of attention + 2 of the MLP + 2 LayerNorms × 2) plus the
    # embedding LayerNorm (2): 6 × 10 + 2 = 62 parameters without decay.
    assert len(kept) == 62 and all(p.endswith(("/bias", "/scale")) for p in kept)
    assert "shared/layer_0/attention_norm/scale" in kept
    assert "shared/embeddings_norm/bias" in kept
    assert "shared/layer_3/attention/query/bias" in kept
    assert "shared/layer_0/attention/query/kernel" in decayed
    assert "shared/word_embeddings/embedding" in decayed
    assert len(decayed) == 3 + 6 * 6  # 3 embedding tables, 6 kernels per layer


def test_adamw_leaves_norms_and_biases_undecayed():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "norm": {"scale": jnp.ones(2)},
    }
    cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=0.1,
            warmup_fraction=0.0,
            weight_decay=0.5,
            clip_norm=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
        )
    )
    for name in ("adamw", "adam"):
        cfg.name = name
        opt = make_optimizer(cfg, total_steps=10)
        state = opt.init(params)
        zero = jax.tree.map(jnp.zeros_like, params)
        # Two steps with zero gradients: only weight decay can move a parameter.
        for _ in range(2):
            updates, state = opt.update(zero, state, params)
            params_next = optax.apply_updates(params, updates)
        moved = _paths(jax.tree.map(lambda a, b: bool(np.any(a != b)), params, params_next))
        assert moved == {"dense/kernel": True, "dense/bias": False, "norm/scale": False}, name
