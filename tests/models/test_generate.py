"""Greedy and beam search token for token equal to transformers' `generate` on tiny random T5
and BART checkpoints (EOS inside the batch included); nucleus sampling keeps exactly the
smallest set of tokens with mass ≥ p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_bart import save_tiny_bart

from jaxret.models.bart import Bart
from jaxret.models.generate import Decoding, filter_logits, generate
from jaxret.models.hf_bart import load_bart
from jaxret.models.hf_t5 import load_t5
from jaxret.models.t5 import T5


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart")
    model = save_tiny_bart(folder, tied=True, bias=True, seed=3)
    with torch.no_grad():  # EOS a little more likely, so that some sequences end early
        model.final_logits_bias[0, 2] += 2.5
    model.save_pretrained(folder)
    cfg, params, _ = load_bart(folder)
    return model, Bart(cfg), params


@pytest.fixture(scope="module")
def t5(tiny_t5):
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(tiny_t5)).eval()
    cfg, params, _ = load_t5(tiny_t5)
    return model, T5(cfg), params


def inputs(vocab, pad, seed=0, batch=4, length=9):
    r = np.random.RandomState(seed)
    ids = r.randint(3, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    ids[mask == 0] = pad
    return ids, mask


def upto_eos(row, eos):
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


def compare(hf, ours_model, params, ids, mask, decoding, **hf_kw):
    cfg = ours_model.config
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.min_new_tokens,
            do_sample=False,
            num_beams=decoding.num_beams,
            num_return_sequences=decoding.num_return,
            length_penalty=decoding.length_penalty,
            early_stopping=decoding.early_stopping,
            use_cache=False,
            **hf_kw,
        ).numpy()[:, 1:]  # drop the decoder start token
    seqs, _, _ = generate(ours_model, params, ids, mask, jax.random.key(0), decoding)
    ours = np.asarray(seqs).reshape(-1, decoding.max_new_tokens)
    ended = 0
    for a, b in zip(ours, ref):
        assert upto_eos(a, cfg.eos_token_id) == upto_eos(b, cfg.eos_token_id)
        ended += cfg.eos_token_id in upto_eos(a, cfg.eos_token_id)[:-1] or (
            cfg.eos_token_id in a and list(a).index(cfg.eos_token_id) < decoding.max_new_tokens - 1
        )
    return ended


@pytest.mark.parametrize("max_new", [1, 5, 12])
def test_greedy_equals_transformers(bart, t5, max_new):
    ended = 0
    for hf, model, params in (bart, t5):
        cfg = model.config
        for seed in (0, 1):
            ids, mask = inputs(cfg.vocab_size, cfg.pad_token_id, seed)
            ended += compare(
                hf, model, params, ids, mask, Decoding("greedy", max_new_tokens=max_new)
            )
    if max_new == 12:
        assert ended > 0  # some sequences end with EOS before the limit


@pytest.mark.parametrize(
    "beams,ret,lp,early,max_new",
    [(3, 1, 1.0, False, 8), (4, 3, 1.0, False, 10), (3, 2, 0.6, True, 10), (2, 2, 2.0, "never", 7)],
)
def test_beam_search_equals_transformers(bart, t5, beams, ret, lp, early, max_new):
    for hf, model, params in (bart, t5):
        cfg = model.config
        for seed in (0, 2):
            ids, mask = inputs(cfg.vocab_size, cfg.pad_token_id, seed)
            d = Decoding(
                "beam",
                max_new_tokens=max_new,
                num_return=ret,
                num_beams=beams,
                length_penalty=lp,
                early_stopping=early,
            )
            compare(hf, model, params, ids, mask, d)


@pytest.mark.parametrize("method,beams", [("greedy", 1), ("beam", 3)])
def test_min_new_tokens_equals_transformers(bart, t5, method, beams):
    for hf, model, params in (bart, t5):
        cfg = model.config
        ids, mask = inputs(cfg.vocab_size, cfg.pad_token_id, 0)
        d = Decoding(method, max_new_tokens=10, num_beams=beams, min_new_tokens=6)
        compare(hf, model, params, ids, mask, d)
        seqs, _, _ = generate(model, params, ids, mask, jax.random.key(0), d)
        assert not (np.asarray(seqs)[..., :6] == cfg.eos_token_id).any()


def test_beam_scores_and_loglik(bart):
    hf, model, params = bart
    ids, mask = inputs(120, 1)
    d = Decoding("beam", max_new_tokens=8, num_return=2, num_beams=3, length_penalty=1.0)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            use_cache=False,
            min_new_tokens=0,
        )
    seqs, loglik, scores = generate(model, params, ids, mask, jax.random.key(0), d)
    np.testing.assert_allclose(
        np.asarray(scores).reshape(-1), out.sequences_scores.numpy(), atol=1e-4
    )
    assert (np.asarray(loglik) <= 0).all()


def test_nucleus_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, p)))[0].tolist()
    # Cumulative mass 0.4, 0.65, 0.8, 0.9, 0.96, 1.0: the smallest prefix with mass ≥ p.
    for p, n in ((0.3, 1), (0.5, 2), (0.7, 3), (0.85, 4), (0.93, 5), (0.99, 6), (1.0, 6)):
        assert kept(p) == [True] * n + [False] * (6 - n), p
    # Order-independent (away from a p that equals a cumulative mass, where fp32 rounding of
    # the sum decides).
    shuffled = jnp.log(jnp.asarray(probs[:, ::-1]))
    for p in (0.75, 0.85, 0.95):
        got = np.isfinite(np.asarray(filter_logits(shuffled, 1.0, 0, p)))[0].tolist()[::-1]
        assert got == kept(p), p
    # A 30k vocabulary: the same set as sorting and summing in float64.
    big = np.random.RandomState(0).randn(4, 30522) * 3
    probs64 = np.exp(big - big.max(1, keepdims=True))
    probs64 /= probs64.sum(1, keepdims=True)
    for p in (0.5, 0.9):
        got = np.isfinite(np.asarray(filter_logits(jnp.asarray(big, jnp.float32), 1.0, 0, p)))
        order = np.argsort(-probs64, axis=1)
        cum = np.cumsum(np.take_along_axis(probs64, order, 1), axis=1)
        sizes = (cum - np.take_along_axis(probs64, order, 1) < p).sum(1)
        np.testing.assert_allclose(got.sum(1), sizes, atol=1)  # at most the edge token differs
        for r in range(4):
            assert got[r, order[r, : sizes[r] - 1]].all()
    assert (
        np.isfinite(np.asarray(filter_logits(logits, 1.0, 2, 1.0)))[0].tolist()
        == [True, True] + [False] * 4
    )
