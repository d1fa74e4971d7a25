"""QGen's retriever stage: a siamese or two-tower BERT retriever trained with in-batch
sampled softmax on the pairs of a BEIR folder (synthetic queries → their passage, `jaxret
generate`'s output), on ICT pairs of its corpus (the paper's baseline) or on qrels with mined
hard negatives (LaPraDoR-FT); dev / test on the real queries of `data.dir`."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.configlib import ConfigError
from jaxret.data import sentences as sent
from jaxret.data.corpus_text import training_corpus
from jaxret.data.readers import Corpus
from jaxret.data.tokenization import Truncation, tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.index.encode import passage_table
from jaxret.methods import contrastive
from jaxret.methods.qgen.pairs import mined_pairs, pairs_fingerprint, read_pairs
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.axes import DATA
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.setup import (
    load_retriever,
    prepare_hint,
    rows_on_devices,
    store_folder,
)

log = logging.getLogger(__name__)


def target_sets(
    cfg: Any, corpus: Corpus | None = None
) -> tuple[ev.EvalData | None, ev.EvalData | None]:
    """(dev, test) real queries of `data.dir`: its `dev_split` and `test_split`, or the test
    split divided by query-id hash (`dev_fraction`) when the folder has one split only."""
    d = cfg.data
    if not d.dir:
        return None, None
    test = ev.load_eval_data(d.dir, d.test_split, corpus=corpus)
    if d.dev_split:
        if d.dev_split == d.test_split:
            raise ConfigError("data.dev_split equals data.test_split: selection would see test")
        dev = ev.load_eval_data(d.dir, d.dev_split, corpus=test.corpus)
    elif d.dev_fraction:
        dev, test = ev.hash_split(test, d.dev_fraction)
    else:
        dev = None
    cap = lambda x: ev.subsample(x, d.max_eval_queries or None, None) if x is not None else None
    return cap(dev), cap(test)


class RetrieverRun(contrastive.ContrastiveRunner):
    name = "QGen-retriever"
    loss_label = "in-batch softmax loss"

    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError("model.name is empty: the BERT checkpoint the retriever starts from")
        if not cfg.data.train_dir:
            raise ConfigError(
                "data.train_dir is empty: the BEIR folder of training pairs (`jaxret generate` "
                "output) or, with qgen.pairs=ict, of the corpus to take ICT pairs from"
            )
        self.cfg = cfg
        self.metric = cfg.eval.metric
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        self.mode = cfg.qgen.pairs
        self.mined = None
        if self.mode not in ("qrels", "ict"):
            raise ConfigError(f"qgen.pairs={self.mode!r}; expected 'qrels' or 'ict'")
        self.store = store = store_folder(cfg, workdir)
        # The training corpus: the store's memory-mapped text table when `jaxret prepare`
        # wrote one (else the file, read here).
        text = training_corpus([cfg.data.train_dir], store)
        if self.mode == "qrels" and cfg.data.get("hard_negatives", ""):
            # Supervised fine-tuning with mined hard negatives (LaPraDoR-FT, BEIR's
            # train_msmarco_v3): one positive and one hard negative per query and step.
            self.pairs, self.mined = mined_pairs(cfg, text)
            corpus = self.pairs.corpus
        elif self.mode == "qrels":
            self.pairs = read_pairs(cfg.data.train_dir, cfg.data.train_split, text)
            corpus = self.pairs.corpus
        else:
            corpus, self.pairs = text, None
        self.corpus = corpus
        same = cfg.data.dir and Path(cfg.data.dir).resolve() == Path(cfg.data.train_dir).resolve()
        self.dev, self.test = target_sets(cfg, corpus if same else None)
        spec = de.EncoderSpec.from_config(cfg.model)
        self.encoder, params, self.tokenizer = load_retriever(cfg, mesh, spec)
        encoder, tokenizer = self.encoder, self.tokenizer
        # Each process of a multi-process run reads what `jaxret prepare` built.
        build = {"multi_process": "refuse", "prepare_hint": prepare_hint(store)}
        if self.mode == "qrels":
            self.table = passage_table(store, corpus, encoder, tokenizer, **build)
            self.table.truncation("passages").report(log)
            self.layout, self.tables = rows_on_devices(self.table, mesh, cfg)
            trunc = Truncation("synthetic queries", spec.max_query_length)
            self.query_tokens = tokenize_queries(
                tokenizer, self.pairs.queries, spec.max_query_length, truncation=trunc
            )
            trunc.report(log)
            self.items = np.arange(len(self.pairs.queries))
        else:
            self.layout, self.tables = None, {}
            self.split = sent.splitter(cfg.data.splitter, "en")
            # (kept in the store: LaPraDoR's table, split once per corpus and splitter)
            counts = sent.sentence_table(store, corpus, cfg.data.splitter, **build)
            self.items = sent.rows_with_sentences(counts)
            if not len(self.items):
                raise ConfigError("no passage has two sentences: ICT has nothing to pair")
        self.start_training(cfg, params, mesh, len(self.items))
        self.compile_step(cfg.qgen.dropout, "the QGen retriever's train step")

    def batch_at(self, step: int) -> dict[str, Any]:
        """Global batch `step`: pairs (or ICT passages) in a seeded per-epoch order."""
        cfg = self.cfg
        b = cfg.train.batch_size
        idx = epoch_batch(self.items, step, b, [cfg.seed, 9])[process_rows(b)]
        spec = self.encoder.spec
        if self.mined is not None:
            # Each query's positives and (seeded-shuffled) negatives taken in turn, one per
            # epoch, as train_msmarco_v3's pop(0)/append (beir …/train_msmarco_v3.py:137-142).
            epoch = step * b // len(self.items)
            rows = [
                [pos[epoch % len(pos)], neg[epoch % len(neg)]]
                for pos, neg in (self.mined[i] for i in idx)
            ]
            local = {
                "query": {k: v[idx] for k, v in self.query_tokens.items()},
                "passage_rows": np.asarray(rows, np.int32),  # [b, 2]: positive, hard negative
            }
            return global_batch(local, self.mesh, DATA)
        if self.mode == "qrels":
            local = {
                "query": {k: v[idx] for k, v in self.query_tokens.items()},
                "passage_rows": self.pairs.rows[idx, None].astype(np.int32),  # [b, 1]
            }
            return global_batch(local, self.mesh, DATA)
        queries, docs = sent.ict_pairs(
            self.split, self.corpus.texts, idx, [cfg.seed, 10, step], cfg.data.ict_remove_prob
        )
        p = tokenize_queries(self.tokenizer, docs, spec.max_passage_length)
        local = {
            "query": tokenize_queries(self.tokenizer, queries, spec.max_query_length),
            "passages": {k: v[:, None] for k, v in p.items()},  # [b, 1, L]
        }
        return global_batch(local, self.mesh, DATA)

    def _metrics(self, params: Any, data: ev.EvalData) -> dict[str, float]:
        scores, rows = ev.dense_search(
            self.encoder,
            params,
            self.tokenizer,
            data,
            self.mesh,
            100,
            self.cfg.encode.batch_size,
            store=self.store,
            progress=False,
        )
        return ev.compute_metrics(data, scores, rows)

    def evaluate(self, state: Any, step: int) -> dict[str, float] | None:
        return None if self.dev is None else self._metrics(state.params, self.dev)

    def finish(self, state: Any) -> dict[str, Any]:
        if self.test is None or not self.cfg.eval.test_at_end:
            return {}
        base = self.baseline_params()
        return {
            "test_before": self._metrics(base, self.test),
            "test_after": self._metrics(state.params, self.test),
        }

    def fingerprints(self) -> dict[str, Any]:
        prints = {"corpus": self.corpus.content_hash()}
        if self.pairs is not None:
            prints["pairs"] = pairs_fingerprint(self.pairs)
        if self.mined is not None:  # the hard negatives (and their seeded order)
            h = hashlib.sha256()
            for pos, neg in self.mined:
                h.update(np.asarray([*pos, -1, *neg], np.int64).tobytes())
            prints["negatives"] = h.hexdigest()[:16]
        return prints
