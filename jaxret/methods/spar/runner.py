"""SPAR's lexical model Λ on the shared loop: a dense retriever trained to imitate BM25.

Data (Chen et al., §4.1 and §5.4): queries are sentences sampled from the corpus
(data.sentences); BM25 retrieves the top K = 50 passages of each; the top n_p = 10 are
positives and the bottom n_n = 5 hard negatives (lexical.labels). Each epoch, every query
gets one positive drawn from its n_p and one hard negative from its n_n; the loss is DPR's
contrastive loss over the global batch (methods.contrastive). Validation is the paper's
surrogate: MRR over a mini-index of one positive and one hard negative per held-out query.
At the end, Λ is compared with its starting point on the evaluation questions of `data.dir`
(retrieval metrics and rank-biased overlap with BM25).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.configlib import ConfigError
from jaxret.data import sentences as sent
from jaxret.data.corpus_store import SHARD_ROWS
from jaxret.data.corpus_text import training_corpus
from jaxret.data.readers import DataError, read_questions
from jaxret.data.tokenization import Truncation, load_tokenizer, tokenize_queries
from jaxret.eval import analysis
from jaxret.eval import evaluate as ev
from jaxret.index.encode import encode_rows, passage_table
from jaxret.lexical.bm25 import BM25, BM25Config
from jaxret.lexical.labels import LabelSpec, TeacherLabels, cached_labels
from jaxret.methods import contrastive
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


def draw(candidates: np.ndarray, rng: np.random.Generator, fallback: int) -> np.ndarray:
    """One valid entry (≥ 0) of each row of `candidates` [B, n], uniformly; a row with none
    takes a random row of the corpus (`fallback` = corpus size)."""
    out = np.empty(len(candidates), np.int32)
    for i, row in enumerate(candidates):
        valid = row[row >= 0]
        out[i] = valid[rng.integers(len(valid))] if len(valid) else rng.integers(fallback)
    return out


def teacher_bm25(cfg: Any, corpus: Any, progress: bool = False) -> BM25:
    """The BM25 teacher of `cfg.labels` (k1, b, analyzer) over `corpus`."""
    config = BM25Config(
        k1=cfg.labels.bm25_k1, b=cfg.labels.bm25_b, analyzer=cfg.labels.get("bm25_analyzer", "none")
    )
    return BM25(corpus, config, show_progress=progress)


def label_spec(cfg: Any) -> LabelSpec:
    return LabelSpec(cfg.labels.top_k, cfg.labels.positives, cfg.labels.negatives)


def prepare(
    cfg: Any, workdir: str | Path, workers: int, shard_rows: int = SHARD_ROWS
) -> dict[str, Any]:
    """`jaxret prepare` for SPAR: the corpus text table, the passage token table, the training
    sentences and the BM25 labels of the sentences and of the dev questions, built before the
    job by `workers` processes (a multi-process run refuses to start without them). Loads no
    weights."""
    if not cfg.model.name:
        raise ConfigError("model.name is empty: the retriever whose tokenizer the store uses")
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty: the corpus whose sentences train Λ")
    store = store_folder(cfg, workdir)
    # The corpus text as a table, memory-mapped by every training process.
    corpus = training_corpus([cfg.data.dir], store, write=True)
    tokenizer = load_tokenizer(de.tokenizer_folder(cfg.model.name))
    spec = de.spec_for(cfg.model.name, de.EncoderSpec.from_config(cfg.model))
    table = passage_table(store, corpus, spec, tokenizer, workers=workers, shard_rows=shard_rows)
    queries, _ = sent.load_or_sample(corpus, query_spec(cfg), store)
    bm25 = teacher_bm25(cfg, corpus, progress=True)
    lspec = label_spec(cfg)
    labels = cached_labels(store, bm25, corpus.content_hash(), queries.texts, lspec, True, workers)
    out: dict[str, Any] = {"passages": table, "labels": labels}
    if cfg.queries.get("dev_questions", ""):
        texts = read_questions(Path(cfg.queries.dev_questions))
        dspec = dataclasses.replace(lspec, positives=1)
        out["dev labels"] = cached_labels(
            store, bm25, corpus.content_hash(), texts, dspec, True, workers
        )
    return out


class SparRun(contrastive.ContrastiveRunner):
    name = "SPAR-Λ"
    metric = "mrr"
    loss_label = "contrastive loss"

    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError("model.name is empty: the BERT checkpoint Λ starts from")
        if not cfg.data.dir:
            raise ConfigError("data.dir is empty: the corpus whose sentences train Λ")
        self.cfg = cfg
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        store = store_folder(cfg, workdir)
        # Λ trains on the corpus alone; its queries, if any, only evaluate (`_eval_data`). The
        # text is the store's memory-mapped table when `jaxret prepare` wrote one.
        self.corpus = corpus = training_corpus([cfg.data.dir], store)
        self.eval_data = self._eval_data()
        spec = de.EncoderSpec.from_config(cfg.model)
        self.encoder, params, self.tokenizer = load_retriever(cfg, mesh, spec)
        encoder, tokenizer = self.encoder, self.tokenizer
        # Each process of a multi-process run reads what `jaxret prepare` built.
        build = {"multi_process": "refuse", "prepare_hint": prepare_hint(store)}
        self.table = passage_table(store, corpus, encoder, tokenizer, **build)
        self.table.truncation("passages").report(log)
        self.layout, self.tables = rows_on_devices(self.table, mesh, cfg)

        self.qspec = qspec = query_spec(cfg)
        queries, path = sent.load_or_sample(corpus, qspec, store)
        log.info("training queries: %s (%s)", sent.describe(queries, corpus), path)
        # Its index is built only if something below needs it (labels missing from the store,
        # the final BM25 overlap), not by every process of a prepared run at start.
        self.bm25 = teacher_bm25(cfg, corpus)
        lspec = label_spec(cfg)
        labels = cached_labels(
            store,
            self.bm25,
            corpus.content_hash(),
            queries.texts,
            lspec,
            prepare_hint=prepare_hint(store),
        )
        keep = np.flatnonzero(labels.valid())
        if len(keep) < len(queries):
            log.warning(
                "%d of %d queries have no BM25 hit; left out",
                len(queries) - len(keep),
                len(queries),
            )
        # A fixed, seeded set of held-out queries for the surrogate MRR.
        order = np.random.default_rng([cfg.seed, 1]).permutation(keep)
        n_dev = min(int(cfg.queries.dev), len(order) // 10)
        self.dev_ids, self.train_ids = np.sort(order[:n_dev]), np.sort(order[n_dev:])
        self.labels = TeacherLabels(labels.positives, labels.negatives)
        trunc = Truncation("training sentences", spec.max_query_length)
        self.query_tokens = tokenize_queries(
            tokenizer, queries.texts, spec.max_query_length, truncation=trunc
        )
        trunc.report(log)
        self.queries = queries
        self.dev_questions = self._dev_questions(store, lspec, tokenizer, spec.max_query_length)

        self.start_training(cfg, params, mesh, len(self.train_ids))
        self.compile_step(cfg.spar.dropout, "the SPAR train step")

    def _eval_data(self) -> ev.EvalData | None:
        cfg = self.cfg
        try:
            data = ev.load_eval_data(cfg.data.dir, cfg.data.eval_split, corpus=self.corpus)
        except DataError as e:  # a bare corpus: Λ trains all the same
            log.info("no before / after evaluation on %s: %s", cfg.data.dir, e)
            return None
        return ev.subsample(data, cfg.data.max_eval_queries or None, None, cfg.seed)

    def batch_at(self, step: int) -> dict[str, Any]:
        """Global batch `step`: a seeded permutation of the training queries per epoch; one
        positive and `spar.hard_negatives` negatives drawn per query with a generator seeded
        by (seed, epoch, step), so the batch is a function of the step alone."""
        cfg = self.cfg
        b = cfg.train.batch_size
        idx = epoch_batch(self.train_ids, step, b, [cfg.seed, 2])
        rng = np.random.default_rng([cfg.seed, 3, step])
        n = len(self.corpus)
        columns = [draw(self.labels.positives[idx], rng, n)]
        for _ in range(cfg.spar.hard_negatives):
            columns.append(draw(self.labels.negatives[idx], rng, n))
        rows = np.stack(columns, 1)  # [B, 1 + n_neg]: positive first
        mine = process_rows(b)
        local = {
            "query": {k: v[idx][mine] for k, v in self.query_tokens.items()},
            "passage_rows": rows[mine],
        }
        return global_batch(local, self.mesh, DATA)

    def _embed_rows(self, params: Any, rows: np.ndarray) -> np.ndarray:
        tokens = {k: np.asarray(v[rows], np.int32) for k, v in self.table.arrays.items()}
        return encode_rows(
            self.encoder,
            params,
            tokens,
            "passage",
            self.mesh,
            range(len(rows)),
            self.cfg.encode.batch_size,
            desc=None,
        )

    def _dev_questions(
        self, store: Path, lspec: LabelSpec, tokenizer: Any, max_length: int
    ) -> tuple[dict, TeacherLabels, np.ndarray] | None:
        """The paper's validation set (§4.1): real dev questions (NQ dev for a Wiki Λ), the
        teacher's top-1 passage the positive, one of its hard negatives the other passage of
        the mini-index. None without `queries.dev_questions`."""
        path = self.cfg.queries.get("dev_questions", "")
        if not path:
            log.info("no queries.dev_questions: Λ is validated on held-out training sentences")
            return None
        texts = read_questions(Path(path))
        dspec = dataclasses.replace(lspec, positives=1)
        labels = cached_labels(
            store,
            self.bm25,
            self.corpus.content_hash(),
            texts,
            dspec,
            prepare_hint=prepare_hint(store),
        )
        keep = np.flatnonzero(labels.valid())
        log.info("Λ validation: %d of %d dev questions from %s", len(keep), len(texts), path)
        tokens = tokenize_queries(tokenizer, texts, max_length)
        return tokens, TeacherLabels(labels.positives, labels.negatives), keep

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """SPAR's surrogate: MRR of each validation query's teacher top-1 in a mini-index of
        every validation query's positive and last hard negative. `mrr` (model selection) is on
        the dev questions when given (the paper's), else on held-out training sentences;
        `sentence_mrr` is always the latter."""
        mrr = lambda tokens, labels, ids: surrogate_mrr(
            self.encoder,
            state.params,
            self.mesh,
            tokens,
            labels,
            ids,
            self._embed_rows,
            self.cfg.encode.batch_size,
        )
        sentences = mrr(self.query_tokens, self.labels, self.dev_ids)
        out = {**sentences, "sentence_mrr": sentences["mrr"]}
        if self.dev_questions is not None:
            questions = mrr(*self.dev_questions)
            out.update(mrr=questions["mrr"], question_mrr=questions["mrr"])
            out.update(questions=questions["queries"], pool=questions["pool"])
        return out

    def finish(self, state: Any) -> dict[str, Any]:
        """Λ against its starting point on `data.dir`'s evaluation questions: retrieval
        metrics and rank-biased overlap with BM25 (p = 0.9, depth 100)."""
        if self.eval_data is None or not self.cfg.eval.test_at_end:
            return {}
        out = {}
        base = self.baseline_params()
        for name, params in (("test_before", base), ("test_after", state.params)):
            out[name] = analysis.retrieval_and_rbo(
                self.encoder,
                params,
                self.tokenizer,
                self.eval_data,
                self.bm25,
                self.mesh,
                self.cfg.encode.batch_size,
                store=self.table.folder.parent,
            )
        return out

    def fingerprints(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.content_hash(),
            "queries": sent.cache_key(self.corpus, self.qspec),
        }


def query_spec(cfg: Any) -> sent.QuerySpec:
    q = cfg.queries
    return sent.QuerySpec(q.mode, q.base, q.splitter, q.language, q.min_chars, cfg.seed)


def surrogate_mrr(
    encoder: de.DualEncoder,
    params: Any,
    mesh: Any,
    query_tokens: dict[str, np.ndarray],
    labels: TeacherLabels,
    ids: np.ndarray,
    embed_rows: Any,
    batch_size: int,
) -> dict[str, float]:
    pos = np.array([row[row >= 0][0] for row in labels.positives[ids]])
    neg = np.array([row[row >= 0][-1] if (row >= 0).any() else -1 for row in labels.negatives[ids]])
    pool = np.unique(np.concatenate([pos, neg[neg >= 0]]))
    p = embed_rows(params, pool)
    q_tok = {k: v[ids] for k, v in query_tokens.items()}
    q = encode_rows(encoder, params, q_tok, "query", mesh, range(len(ids)), batch_size, desc=None)
    scores = q.astype(np.float64) @ p.astype(np.float64).T  # [Q, pool]
    target = np.searchsorted(pool, pos)
    own = scores[np.arange(len(ids)), target]
    rank = 1 + (scores > own[:, None]).sum(1)
    return {"mrr": float(np.mean(1.0 / rank)), "pool": float(len(pool)), "queries": float(len(ids))}


train = SparRun.train
