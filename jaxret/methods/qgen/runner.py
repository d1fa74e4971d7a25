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

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxret.configlib import ConfigError
from jaxret.data import sentences as sent
from jaxret.data.corpus_store import SHARD_ROWS
from jaxret.data.corpus_text import training_corpus
from jaxret.data.readers import Corpus, find_corpus
from jaxret.data.tokenization import load_tokenizer
from jaxret.eval import evaluate as ev
from jaxret.index.encode import passage_table
from jaxret.methods.qgen import generation
from jaxret.methods.qgen.generator import GeneratorRun
from jaxret.methods.qgen.retriever import RetrieverRun
from jaxret.models import dual_encoder as de
from jaxret.models.dual_encoder import read_best_params
from jaxret.models.seq2seq import load_generator, save_generator
from jaxret.train.setup import store_folder

log = logging.getLogger(__name__)


def stage_config(cfg: Any, section: str) -> Any:
    """A copy of `cfg` whose `train` and `optimizer` are those of `cfg.<section>` (each stage
    has its own steps, batch size and learning rate)."""
    out = copy.deepcopy(cfg)
    with out.unlocked() if hasattr(out, "unlocked") else contextlib.nullcontext():
        out.train = copy.deepcopy(cfg[section].train)
        out.optimizer = copy.deepcopy(cfg[section].optimizer)
    return out


def train_generator(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    gcfg = stage_config(cfg, "generator")
    return GeneratorRun.train(gcfg, workdir)


def train_retriever(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    return RetrieverRun.train(cfg, workdir)


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
    generation.generate_queries(
        generator,
        params,
        tokenizer,
        target.corpus,
        corpus_path,
        synthetic_dir,
        generation.config_spec(cfg),
        progress=cfg.train.progress,
    )
    log.info("synthetic queries: %s", _examples(synthetic_dir, target.corpus, 3))
    rcfg = copy.deepcopy(cfg)
    with rcfg.unlocked() if hasattr(rcfg, "unlocked") else contextlib.nullcontext():
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


def prepare(
    cfg: Any, workdir: str | Path, workers: int, shard_rows: int = SHARD_ROWS
) -> dict[str, Any]:
    """`jaxret prepare` for the retriever stage (qgen.stage=retriever, or the retriever that
    adapt ends with, in WORKDIR/retriever): its corpus's text table and, for qrels pairs, the
    passage token table, for ICT pairs, the sentences per passage and the rows with two or
    more — built before the job by `workers` processes (a multi-process retriever refuses to
    start without them). Adapt's corpus is `data.dir`'s: the synthetic folder links it, so
    the tables built from it are the ones the retriever opens. Loads no weights."""
    stage = cfg.qgen.stage
    if stage == "generator":  # (the launch scripts prepare before every job: not an error)
        log.warning("qgen.stage=generator: nothing to prepare (the generator tokenizes its pairs)")
        return {}
    if not cfg.model.name:
        raise ConfigError("model.name is empty: the retriever whose tokenizer the store uses")
    source, workdir = cfg.data.train_dir, Path(workdir)
    if stage == "adapt":
        source, workdir = cfg.data.dir, workdir / "retriever"
    if not source:
        key = "data.dir" if stage == "adapt" else "data.train_dir"
        raise ConfigError(f"{key} is empty: the corpus the retriever trains on")
    store = store_folder(cfg, workdir)
    corpus = training_corpus([source], store, write=True)
    if cfg.qgen.pairs == "ict" and stage != "adapt":
        table = sent.sentence_table(store, corpus, cfg.data.splitter, workers, shard_rows)
        sent.rows_with_sentences(table)
        return {"sentences": table}
    tokenizer = load_tokenizer(de.tokenizer_folder(cfg.model.name))
    spec = de.spec_for(cfg.model.name, de.EncoderSpec.from_config(cfg.model))
    table = passage_table(store, corpus, spec, tokenizer, workers=workers, shard_rows=shard_rows)
    return {"passages": table}


def train(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = {"generator": train_generator, "retriever": train_retriever, "adapt": adapt}
    stage = cfg.qgen.stage
    if stage not in stages:
        raise ConfigError(f"qgen.stage={stage!r}; expected {', '.join(stages)}")
    return stages[stage](cfg, workdir)
