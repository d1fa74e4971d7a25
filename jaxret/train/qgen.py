"""Query generation (Liang et al., "Embedding-based Zero-shot Retrieval through Query
Generation") on the shared loop, in three stages that chain into domain adaptation.

  generator  fine-tune a T5 / BART generator (or a small BART from scratch, offline demos) on
             (passage → query) pairs of a BEIR folder's qrels; dev: token cross-entropy of
             held-out pairs; export: an HF folder `AutoModelForSeq2SeqLM` loads.
  retriever  train a siamese or two-tower BERT retriever with in-batch sampled softmax on the
             pairs of a BEIR folder (synthetic queries → their passage, `jaxret generate`'s
             output) or on ICT pairs of its corpus (the paper's baseline); dev / test on the
             real queries of `data.dir`.
  adapt      the chain: train the generator if asked, generate queries for `data.dir`'s
             corpus, train the retriever on them, report the real test queries before / after.
             Every stage resumes: a killed chain restarts where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxret.configlib import ConfigError
from jaxret.data import sentences as sent
from jaxret.data import synthetic
from jaxret.data.readers import (
    Corpus,
    DataError,
    find_corpus,
    read_corpus,
    read_hard_negatives,
)
from jaxret.data.tokenization import Truncation, load_tokenizer, tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.index.encode import passage_table, tables_on_device, token_keys
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.models import dual_encoder as de
from jaxret.models.generate import Decoding
from jaxret.models.seq2seq import Generator, load_generator, save_generator, scratch_generator
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.activations import Activations
from jaxret.parallel.host_data import place
from jaxret.recipes import contrastive
from jaxret.recipes import seq2seq as gen_step
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.checkpoint import read_best_params
from jaxret.train.loop import Recipe, run
from jaxret.train.optim import start_training

log = logging.getLogger(__name__)
DATA = PartitionSpec("data")


# ---------------------------------------------------------------------------------------------
# Pairs


@dataclasses.dataclass
class Pairs:
    """(query, passage row) training pairs over `corpus`."""

    corpus: Corpus
    queries: list[str]
    rows: np.ndarray  # [P] int: the passage row of each query


def read_pairs(folder: str | Path, split: str) -> Pairs:
    """Every (query, relevant passage) of a BEIR folder's `qrels/<split>.tsv` (relevance > 0),
    in query order; a query with several relevant passages gives several pairs."""
    data = ev.load_eval_data(folder, split)
    if data.qrels is None:
        raise DataError(f"{folder}: no qrels/{split}.tsv to take (query, passage) pairs from")
    queries, rows = [], []
    for qid, text in zip(data.query_ids, data.query_texts):
        for doc, rel in sorted(data.qrels.get(qid, {}).items()):
            if rel > 0 and doc in data.corpus.row_of:
                queries.append(text)
                rows.append(data.corpus.row_of[doc])
    if not queries:
        raise DataError(f"{folder}: qrels/{split}.tsv has no positive pair inside the corpus")
    return Pairs(data.corpus, queries, np.asarray(rows, np.int64))


def mined_pairs(cfg: Any) -> tuple[Pairs, list[tuple[list[int], list[int]]]]:
    """The queries of `data.train_dir`'s `train_split` that the mined hard-negatives file
    (`data.hard_negatives`) gives a positive and a hard negative: (Pairs with each query's
    first positive, [(positive rows, negative rows shuffled by the seed)] per query)."""
    data = ev.load_eval_data(cfg.data.train_dir, cfg.data.train_split)
    mined = read_hard_negatives(
        cfg.data.hard_negatives,
        set(data.query_ids),
        data.corpus.row_of,
        cfg.data.get("ce_score_margin", 3.0),
        cfg.data.get("negatives_per_system", 5),
    )
    text_of = dict(zip(data.query_ids, data.query_texts))
    rng = np.random.default_rng([cfg.seed, 11])
    lists = [
        (pos, list(rng.permutation(neg))) for pos, neg in zip(mined.positives, mined.negatives)
    ]
    queries = [text_of[q] for q in mined.query_ids]
    rows = np.asarray([pos[0] for pos in mined.positives], np.int64)
    log.info("%d training queries with mined hard negatives", len(queries))
    return Pairs(data.corpus, queries, rows), lists


def held_out(n: int, n_dev: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) positions: a seeded random `n_dev` of `n` held out, both sorted."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[n_dev:]), np.sort(order[:n_dev])


def stage_config(cfg: Any, section: str) -> Any:
    """A copy of `cfg` whose `train` and `optimizer` are those of `cfg.<section>` (each stage
    has its own steps, batch size and learning rate)."""
    out = copy.deepcopy(cfg)
    with out.unlocked() if hasattr(out, "unlocked") else _nullcontext():
        out.train = copy.deepcopy(cfg[section].train)
        out.optimizer = copy.deepcopy(cfg[section].optimizer)
    return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Generator fine-tuning


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
    tokenizer: Any, corpus: Corpus, rows: np.ndarray, spec: synthetic.GenerationSpec, pad_id: int
) -> dict[str, np.ndarray]:
    """Generator inputs [N, max_input_length] exactly as `jaxret generate` builds them."""
    ids = np.full((len(rows), spec.max_input_length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for s in range(0, len(rows), 1024):
        chunk = rows[s : s + 1024]
        i, m = synthetic.encode_inputs(
            tokenizer,
            [corpus.titles[r] for r in chunk],
            [corpus.texts[r] for r in chunk],
            spec,
            pad_id,
        )
        ids[s : s + len(chunk), : i.shape[1]], mask[s : s + len(chunk), : i.shape[1]] = i, m
    return {"input_ids": ids, "attention_mask": mask}


def generation_spec(cfg: Any) -> synthetic.GenerationSpec:
    """`jaxret generate`'s settings from the config's `generate` section."""
    g = cfg.generate
    if g.decoding == "beam":
        decoding = Decoding("beam", g.max_length, num_return=g.keep, num_beams=g.num_beams)
    elif g.decoding == "greedy":
        decoding = Decoding("greedy", g.max_length)
    elif g.decoding in ("nucleus", "top_k"):
        decoding = Decoding(
            "sample",
            g.max_length,
            num_return=g.num_samples,
            top_p=g.top_p if g.decoding == "nucleus" else 1.0,
            top_k=g.top_k,
        )
    else:
        raise ConfigError(f"generate.decoding={g.decoding!r}; expected nucleus|top_k|beam|greedy")
    return synthetic.GenerationSpec(
        decoding,
        g.keep,
        cfg.generator.max_input_length,
        cfg.generator.prefix,
        cfg.seed,
        g.batch_size,
        g.shard_size,
        g.get("length_normalized", False),
    )


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


class GeneratorRun:
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
        spec = generation_spec(cfg)
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
        start = start_training(cfg, params, mesh, len(self.train_ids))
        self.total, self.optimizer, self.lr_at = start.total, start.optimizer, start.lr_at
        self.state, self.shardings = start.state, start.shardings
        batch_sh = NamedSharding(mesh, DATA)
        in_shardings = (self.shardings, jax.tree.map(lambda _: batch_sh, self.batch_at(0)))
        self.step_fn = gen_step.make_train_step(
            self.generator, self.optimizer, mesh, in_shardings, dropout=g.dropout
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

    def recipe(self) -> Recipe:
        return Recipe(
            name="QGen-generator",
            state=self.state,
            train_step=self.train_step,
            batch_at=self.batch_at,
            total_steps=self.total,
            metric="dev_loss",
            higher_is_better=False,
            evaluate=self.evaluate,
            export=self.export,
            lr_at=self.lr_at,
            fingerprints={
                "pairs": pairs_fingerprint(self.pairs),
                "corpus": self.pairs.corpus.content_hash(),
            },
            loss_label="token cross-entropy",
        )


def pairs_fingerprint(pairs: Pairs) -> str:
    import hashlib

    h = hashlib.sha256()
    for q, r in zip(pairs.queries, pairs.rows.tolist()):
        h.update(f"{r}\t{q}\x00".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Retriever training


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


class RetrieverRun:
    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError("model.name is empty: the BERT checkpoint the retriever starts from")
        if not cfg.data.train_dir:
            raise ConfigError(
                "data.train_dir is empty: the BEIR folder of training pairs (`jaxret generate` "
                "output) or, with qgen.pairs=ict, of the corpus to take ICT pairs from"
            )
        self.cfg = cfg
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        self.mode = cfg.qgen.pairs
        self.mined = None
        if self.mode == "qrels" and cfg.data.get("hard_negatives", ""):
            # Supervised fine-tuning with mined hard negatives (LaPraDoR-FT, BEIR's
            # train_msmarco_v3): one positive and one hard negative per query and step.
            self.pairs, self.mined = mined_pairs(cfg)
            corpus = self.pairs.corpus
        elif self.mode == "qrels":
            self.pairs = read_pairs(cfg.data.train_dir, cfg.data.train_split)
            corpus = self.pairs.corpus
        elif self.mode == "ict":
            corpus = read_corpus(find_corpus(cfg.data.train_dir))
            self.pairs = None
        else:
            raise ConfigError(f"qgen.pairs={self.mode!r}; expected 'qrels' or 'ict'")
        self.corpus = corpus
        same = cfg.data.dir and Path(cfg.data.dir).resolve() == Path(cfg.data.train_dir).resolve()
        self.dev, self.test = target_sets(cfg, corpus if same else None)
        spec = de.EncoderSpec.from_config(cfg.model)
        encoder, params, tok_folder = de.from_pretrained(
            cfg.model.name, spec, cfg.model.passage_name or None, jax.random.key(cfg.seed)
        )
        self.encoder = encoder = encoder.with_activations(
            Activations.for_strategy(mesh, cfg.mesh.param_sharding)
        )
        self.tokenizer = tokenizer = load_tokenizer(tok_folder)
        self.store = store = Path(cfg.data.store) if cfg.data.store else workdir / "store"
        if self.mode == "qrels":
            self.table = passage_table(store, corpus, encoder, tokenizer)
            self.table.truncation("passages").report(log)
            self.layout = RowLayout.for_mesh(len(corpus), mesh, cfg.encode.chunk_rows)
            self.tables = tables_on_device(
                self.table, self.layout, mesh, token_keys(spec.passage_format)
            )
            trunc = Truncation("synthetic queries", spec.max_query_length)
            self.query_tokens = tokenize_queries(
                tokenizer, self.pairs.queries, spec.max_query_length, truncation=trunc
            )
            trunc.report(log)
            self.items = np.arange(len(self.pairs.queries))
        else:
            self.layout, self.tables = None, {}
            self.split = sent.splitter(cfg.data.splitter, "en")
            counts = [len(self.split(x)) for x in corpus.texts]
            self.items = np.flatnonzero(np.asarray(counts) >= 2)
            if not len(self.items):
                raise ConfigError("no passage has two sentences: ICT has nothing to pair")
        start = start_training(cfg, params, mesh, len(self.items))
        self.total, self.optimizer, self.lr_at = start.total, start.optimizer, start.lr_at
        self.state, self.shardings = start.state, start.shardings
        self.initial_params = params
        ccfg = contrastive.ContrastiveConfig.for_encoder(self.encoder, dropout=cfg.qgen.dropout)
        batch_sh = NamedSharding(mesh, DATA)
        in_shardings = (
            self.shardings,
            jax.tree.map(lambda _: batch_sh, self.batch_at(0)),
            jax.tree.map(lambda _: row_sharding(mesh), self.tables),
        )
        self.step_fn = contrastive.make_train_step(
            encoder, self.optimizer, ccfg, mesh, in_shardings, self.layout
        )

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

    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        return self.step_fn(state, batch, self.tables)

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

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        return self._metrics(state.params, self.dev)

    def finish(self, state: Any) -> dict[str, Any]:
        if self.test is None or not self.cfg.eval.test_at_end:
            return {}
        base = place(self.initial_params, self.shardings.params)
        return {
            "test_before": self._metrics(base, self.test),
            "test_after": self._metrics(state.params, self.test),
        }

    def export(self, params: Any, folder: Path) -> None:
        de.export(self.encoder, params, folder, self.tokenizer)

    def recipe(self) -> Recipe:
        prints = {"corpus": self.corpus.content_hash()}
        if self.pairs is not None:
            prints["pairs"] = pairs_fingerprint(self.pairs)
        if self.mined is not None:  # the hard negatives (and their seeded order)
            h = hashlib.sha256()
            for pos, neg in self.mined:
                h.update(np.asarray([*pos, -1, *neg], np.int64).tobytes())
            prints["negatives"] = h.hexdigest()[:16]
        return Recipe(
            name="QGen-retriever",
            state=self.state,
            train_step=self.train_step,
            batch_at=self.batch_at,
            total_steps=self.total,
            metric=self.cfg.eval.metric,
            evaluate=self.evaluate if self.dev is not None else None,
            export=self.export,
            finish=self.finish,
            lr_at=self.lr_at,
            fingerprints=prints,
            loss_label="in-batch softmax loss",
        )


# ---------------------------------------------------------------------------------------------
# Stages


def _run(runner: Any, cfg: Any, workdir: Path) -> dict[str, Any]:
    summary = run(cfg, runner.recipe(), workdir)
    summary["params"] = summary["state"].params
    return summary


def train_generator(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    gcfg = stage_config(cfg, "generator")
    return _run(GeneratorRun(gcfg, workdir), gcfg, workdir)


def train_retriever(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    return _run(RetrieverRun(cfg, workdir), cfg, workdir)


def adapt(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    """generator (trained here if `generator.data.dir` is set) → synthetic queries for
    `data.dir`'s corpus → retriever trained on them → real test queries before / after."""
    workdir = Path(workdir)
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty: the target BEIR folder to adapt to")
    generator_dir: str | Path = cfg.generator.name
    if cfg.generator.data.dir:
        gen = train_generator(cfg, workdir / "generator")
        if "preempted_at" in gen:
            return gen
        best = workdir / "generator" / "best"
        generator_dir = workdir / "generator" / "export"
        if cfg.generator.use_best and (best / "best.json").is_file():
            generator_dir = _best_generator(cfg, workdir / "generator")
    if not generator_dir:
        raise ConfigError("no generator: set generator.name or generator.data.dir")
    generator, params, tokenizer, _ = load_generator(generator_dir, cfg.generator.dtype)
    target = ev.load_eval_data(cfg.data.dir, cfg.data.test_split)
    corpus_path = find_corpus(cfg.data.dir)
    synthetic_dir = workdir / "synthetic"
    synthetic.generate_queries(
        generator,
        params,
        tokenizer,
        target.corpus,
        corpus_path,
        synthetic_dir,
        generation_spec(cfg),
        progress=cfg.train.progress,
    )
    log.info("synthetic queries: %s", _examples(synthetic_dir, target.corpus, 3))
    rcfg = copy.deepcopy(cfg)
    with rcfg.unlocked() if hasattr(rcfg, "unlocked") else _nullcontext():
        rcfg.data.train_dir = str(synthetic_dir)
        rcfg.data.train_split = "train"
    summary = train_retriever(rcfg, workdir / "retriever")
    summary["generator"] = str(generator_dir)
    summary["synthetic"] = str(synthetic_dir)
    summary["run_dir"] = str(workdir / "retriever")  # where its checkpoints, logs, export are
    return summary


def _best_generator(cfg: Any, gen_workdir: Path) -> Path:
    """The best-by-dev generator parameters written as an HF folder (once)."""
    out = gen_workdir / "best_export"
    if (out / "config.json").is_file():
        return out
    generator, params, tokenizer, _ = load_generator(gen_workdir / "export", cfg.generator.dtype)
    if jax.process_index() == 0:
        best = read_best_params(gen_workdir / "best", params)
        save_generator(out, generator, best, tokenizer)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxret-best-generator")
    return out


def _examples(folder: Path, corpus: Corpus, n: int) -> str:
    lines = (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines()[: n * 5 : 5]
    out = []
    for line in lines:
        row = json.loads(line)
        text = corpus.texts[corpus.row_of[row["passage"]]][:80]
        out.append(f"\n  {text!r}… → {row['text']!r}")
    return "".join(out)


def train(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = {"generator": train_generator, "retriever": train_retriever, "adapt": adapt}
    stage = cfg.qgen.stage
    if stage not in stages:
        raise ConfigError(f"qgen.stage={stage!r}; expected {', '.join(stages)}")
    return stages[stage](cfg, workdir)
