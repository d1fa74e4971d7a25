"""QGen's first stage: a T5 / BART generator fine-tuned on (passage → query) pairs (or a
small BART from scratch, offline demos); dev: token cross-entropy of held-out pairs; export:
an HF folder `AutoModelForSeq2SeqLM` loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxret.configlib import ConfigError
from jaxret.data.readers import (
    Corpus,
)
from jaxret.data.tokenization import Truncation
from jaxret.methods import seq2seq as gen_step
from jaxret.methods.qgen import generation
from jaxret.methods.qgen.pairs import held_out, pairs_fingerprint, read_pairs
from jaxret.models.seq2seq import Generator, load_generator, save_generator, scratch_generator
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.axes import DATA
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.loop import Runner
from jaxret.train.setup import batch_shardings
from jaxret.train.state import compile_ahead

log = logging.getLogger(__name__)


def tokenize_targets(
    tokenizer: Any, texts: list[str], max_length: int, truncation: Truncation | None = None
) -> dict[str, np.ndarray]:
    """Query tokens as the tokenizer writes labels (T5: `q </s>`, BART: `<s> q </s>`, BERT:
    `[CLS] q [SEP]`), cut to `max_length` keeping the end token, padded [N, max_length]."""
    rows = tokenizer(text_target=texts)["input_ids"]
    if truncation is not None:
        truncation.add([len(r) for r in rows])
    ids = np.zeros((len(rows), max_length), np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    for i, r in enumerate(rows):
        r = r if len(r) <= max_length else r[: max_length - 1] + r[-1:]
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def tokenize_sources(
    tokenizer: Any, corpus: Corpus, rows: np.ndarray, spec: generation.GenerationSpec, pad_id: int
) -> dict[str, np.ndarray]:
    """Generator inputs [N, max_input_length] exactly as `jaxret generate` builds them."""
    ids = np.full((len(rows), spec.max_input_length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for s in range(0, len(rows), 1024):
        chunk = rows[s : s + 1024]
        i, m = generation.encode_inputs(
            tokenizer,
            [corpus.titles[r] for r in chunk],
            [corpus.texts[r] for r in chunk],
            spec,
            pad_id,
        )
        ids[s : s + len(chunk), : i.shape[1]], mask[s : s + len(chunk), : i.shape[1]] = i, m
    return {"input_ids": ids, "attention_mask": mask}


def build_generator(cfg: Any) -> tuple[Generator, dict, Any]:
    """The generator to fine-tune: an HF checkpoint (`generator.name`) or, with an empty name,
    a BART of `generator.scratch` sizes on the tokenizer of `generator.tokenizer`."""
    g = cfg.generator
    if g.name:
        generator, params, tokenizer, _ = load_generator(g.name, g.dtype, g.remat)
        return generator, params, tokenizer
    if not g.tokenizer:
        raise ConfigError(
            "generator.name is empty and so is generator.tokenizer: give an HF T5 / BART "
            "checkpoint, or a tokenizer folder for a generator trained from scratch"
        )
    return scratch_generator(
        g.tokenizer, dict(g.scratch), jax.random.key(cfg.seed), g.dtype, g.remat
    )


class GeneratorRun(Runner):
    name = "QGen-generator"
    metric = "dev_loss"
    higher_is_better = False
    loss_label = "token cross-entropy"

    def __init__(self, cfg: Any, workdir: Path):
        g = cfg.generator
        if not g.data.dir:
            raise ConfigError("generator.data.dir is empty: the BEIR folder of training pairs")
        self.cfg = cfg
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        self.generator, params, self.tokenizer = build_generator(cfg)
        pairs = read_pairs(g.data.dir, g.data.split)
        self.pairs = pairs
        n_dev = min(int(g.data.dev_pairs), len(pairs.queries) // 10)
        self.train_ids, self.dev_ids = held_out(len(pairs.queries), n_dev, cfg.seed)
        spec = generation.config_spec(cfg)
        pad = self.generator.config.pad_token_id
        self.source = tokenize_sources(self.tokenizer, pairs.corpus, pairs.rows, spec, pad)
        trunc = Truncation("generator targets", g.max_target_length)
        self.target = tokenize_targets(self.tokenizer, pairs.queries, g.max_target_length, trunc)
        trunc.report(log)
        log.info(
            "generator pairs: %d train, %d dev (%s, %s)",
            len(self.train_ids),
            len(self.dev_ids),
            g.data.dir,
            g.data.split,
        )
        self.start_training(cfg, params, mesh, len(self.train_ids))
        example = self.batch_at(0)
        in_shardings = (self.shardings, batch_shardings(mesh, example))
        self.step_fn = compile_ahead(
            gen_step.make_train_step(
                self.generator, self.optimizer, mesh, in_shardings, dropout=g.dropout
            ),
            (self.state, example),
            "the QGen generator's train step",
            "a smaller train.batch_size or generator.max_input_length, generator.remat=True, "
            "mesh.param_sharding=fsdp, or more devices",
        )
        self.dev_fn = jax.jit(self._dev_sums)

    def _batch(self, idx: np.ndarray) -> dict[str, Any]:
        return {
            "source": {k: v[idx] for k, v in self.source.items()},
            "target": {k: v[idx] for k, v in self.target.items()},
        }

    def batch_at(self, step: int) -> dict[str, Any]:
        b = self.cfg.train.batch_size
        idx = epoch_batch(self.train_ids, step, b, [self.cfg.seed, 8])
        return global_batch(self._batch(idx[process_rows(b)]), self.mesh, DATA)

    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        return self.step_fn(state, batch)

    def _dev_sums(self, params: Any, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        loss, metrics = gen_step.generator_loss(
            params, batch, jax.random.key(0), generator=self.generator, dropout=False
        )
        return loss * metrics["tokens"], metrics["tokens"]

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """Token cross-entropy (nats per query token) of the held-out pairs."""
        if not len(self.dev_ids):
            return {}
        b = -(-self.cfg.encode.batch_size // self.mesh.size) * self.mesh.size
        total, tokens = 0.0, 0.0
        for s in range(0, len(self.dev_ids), b):
            idx = self.dev_ids[s : s + b]
            batch = self._batch(np.resize(idx, b))
            batch["target"]["attention_mask"][len(idx) :] = 0  # the wrapped rows do not count
            batch = jax.device_put(batch, NamedSharding(self.mesh, DATA))
            loss_sum, count = self.dev_fn(state.params, batch)
            total, tokens = total + float(loss_sum), tokens + float(count)
        return {"dev_loss": total / max(tokens, 1.0), "dev_pairs": float(len(self.dev_ids))}

    def export(self, params: Any, folder: Path) -> None:
        save_generator(folder, self.generator, params, self.tokenizer)

    def fingerprints(self) -> dict[str, Any]:
        return {
            "pairs": pairs_fingerprint(self.pairs),
            "corpus": self.pairs.corpus.content_hash(),
        }
