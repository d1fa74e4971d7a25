"""ART on the shared loop: data, device-resident corpus, index refresh, teacher, evaluation.

What the loop gets from here (jaxret.train.loop.Runner's hooks):
  train_step   methods.art.step's jitted step, closed over the current index, the token tables
               and the teacher;
  after_step   the index refresh of `art.refresh` (refresh.py: SyncRefresh, the paper's, or
               RollingRefresh), which also owns the index's checkpointed item (aux);
  evaluate     dev top-k accuracy or nDCG@10 / Recall@100 on the training index (its age
               reported) or on a fresh index of the current parameters (`eval.index`);
  finish       the test split, before (the initial parameters) and after training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxret.configlib import ConfigError
from jaxret.data.corpus_store import SHARD_ROWS, TokenTable, open_table, tokenizer_fingerprint
from jaxret.data.corpus_text import stored_corpus, write_text_table
from jaxret.data.readers import find_corpus, read_corpus
from jaxret.data.tokenization import Truncation, load_tokenizer, tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.eval import qa
from jaxret.index.encode import empty_index, passage_table, tables_on_device
from jaxret.index.mips import row_sharding
from jaxret.index.rolling import (
    refresh_in_slices,
)
from jaxret.index.sharded import ShardedIndex
from jaxret.methods.art import step as art
from jaxret.methods.art.data import ArtData, load_art_data, sparse_teacher_table
from jaxret.methods.art.refresh import make_refresh, tower_of
from jaxret.models import dual_encoder as de
from jaxret.models import hf_io
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.axes import DATA
from jaxret.teachers import t5_teacher
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.row_snapshot import Rows
from jaxret.train.setup import (
    RetrieverRunner,
    batch_shardings,
    load_retriever,
    prepare_hint,
    rows_on_devices,
    store_folder,
)
from jaxret.train.state import compile_ahead

log = logging.getLogger(__name__)


def _hash_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def teacher_spec(cfg: Any) -> t5_teacher.TeacherSpec:
    return t5_teacher.TeacherSpec(
        max_passage_length=cfg.teacher.max_passage_length,
        max_question_length=cfg.teacher.max_question_length,
        chunk_pairs=cfg.teacher.chunk_pairs,
    )


def open_tables(
    cfg: Any,
    spec: de.EncoderSpec,
    corpus: Any,
    store: Path,
    tokenizer: Any,
    teacher_tokenizer: Any = None,
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
) -> dict[str, TokenTable]:
    """ART's token tables of `corpus` — the retriever's passages and, with a T5 teacher, the
    teacher's verbalized passages — opened from `store` or built there. Training with more
    than one process never builds them (`jaxret prepare` does, before the job). `spec`: the
    retriever's, its lengths cut to the model's positions (`de.spec_for`)."""
    build = {
        "workers": workers,
        "shard_rows": shard_rows,
        "multi_process": "refuse",
        "prepare_hint": prepare_hint(store),
    }
    tables = {"passages": passage_table(store, corpus, spec, tokenizer, **build)}
    tables["passages"].truncation("retriever passages").report(log)
    if cfg.teacher.kind == "t5":
        tspec = teacher_spec(cfg)
        t5_teacher.check_passage_room(teacher_tokenizer, tspec)

        def tokenize(titles: list[str], texts: list[str], trunc: Truncation) -> dict:
            return t5_teacher.tokenize_passages(teacher_tokenizer, titles, texts, tspec, trunc)

        fp = {
            "tokenizer": tokenizer_fingerprint(teacher_tokenizer),
            "vocab_size": len(teacher_tokenizer),
            "max_length": tspec.max_passage_length,
            "verbalizer": tspec.verbalize("{t}", "{x}"),
        }
        tables["teacher"] = open_table(store, "teacher", corpus, tokenize, fp, **build)
        tables["teacher"].truncation("teacher passages").report(log)
    return tables


def prepare(
    cfg: Any, workdir: str | Path, workers: int, shard_rows: int = SHARD_ROWS
) -> dict[str, TokenTable]:
    """`jaxret prepare`: ART's token tables built before the training job, by `workers`
    processes (the same bytes for any count), resumable after a kill. Loads no weights and
    starts no devices."""
    from transformers import AutoTokenizer

    if not cfg.model.name:
        raise ConfigError("model.name is empty: the retriever whose tokenizer the store uses")
    store = store_folder(cfg, workdir)
    if cfg.data.dir:  # the corpus text, memory-mapped by every training process
        source = find_corpus(Path(cfg.data.dir))
        if stored_corpus(store, source) is None:
            write_text_table(store, source, read_corpus(source))
    data = load_art_data(cfg.data, store)
    tokenizer = load_tokenizer(de.tokenizer_folder(cfg.model.name))
    teacher_tokenizer = None
    if cfg.teacher.kind == "t5":
        folder = hf_io.resolve_checkpoint(cfg.teacher.model)
        teacher_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    spec = de.spec_for(cfg.model.name, de.EncoderSpec.from_config(cfg.model))
    return open_tables(
        cfg, spec, data.corpus, store, tokenizer, teacher_tokenizer, workers, shard_rows
    )


class ArtRun(RetrieverRunner):
    """Everything one ART run holds besides the train state."""

    name = "ART"
    loss_label = "KL loss"

    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError(
                "model.name is empty: give the retriever to start from with "
                "--config.model.name=CHECKPOINT (an HF BERT or MegatronBERT folder, a hub id, "
                "or a jaxret export)"
            )
        self.cfg = cfg
        self.metric = cfg.eval.metric
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        try:
            workers = qa.workers_for(
                int(cfg.eval.get("answer_workers", -1)), mesh.devices.flat[0].platform
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.answer_matcher = qa.AnswerMatcher(workers)
        store = store_folder(cfg, workdir)
        self.data: ArtData = load_art_data(cfg.data, store)
        data = self.data
        spec = de.EncoderSpec.from_config(cfg.model)
        self.encoder, params, self.tokenizer = load_retriever(cfg, mesh, spec)
        encoder, tokenizer = self.encoder, self.tokenizer
        if tokenizer.pad_token_id != 0:
            raise ValueError(
                f"the retriever tokenizer pads with id {tokenizer.pad_token_id}; the ART step "
                "derives attention masks from pad id 0 (BERT's and T5's)"
            )
        self.store = store
        self.teacher_tokenizer = None
        if cfg.teacher.kind == "t5":
            from transformers import AutoTokenizer

            self.teacher_tokenizer = AutoTokenizer.from_pretrained(
                str(hf_io.resolve_checkpoint(cfg.teacher.model))
            )
        self.tables = open_tables(
            cfg, encoder.spec, data.corpus, store, tokenizer, self.teacher_tokenizer
        )
        self.p_table = self.tables["passages"]
        self.corpus_hash = data.corpus.content_hash()
        self.layout, self.passage_tables = rows_on_devices(self.p_table, mesh, cfg)

        self.art_cfg = art.ArtConfig(
            top_k=min(cfg.art.top_k, len(data.corpus)),
            temperature_multiplier=cfg.art.temperature_multiplier,
            teacher=cfg.teacher.kind,
            teacher_temperature=cfg.teacher.temperature,
            dropout=cfg.art.dropout,
        )
        q_trunc = Truncation("training questions (retriever)", spec.max_query_length)
        q_tokens = tokenize_queries(
            tokenizer, data.train_questions, spec.max_query_length, truncation=q_trunc
        )
        q_trunc.report(log)
        self.host_batch: dict[str, Any] = {"query": q_tokens}
        self.teacher, self.teacher_params, self.teacher_tables = None, None, {}
        if self.art_cfg.teacher == "t5":
            self._setup_t5_teacher()
        else:
            ids, scores = sparse_teacher_table(data, self.art_cfg.teacher, cfg.teacher)
            self.host_batch["teacher_ids"], self.host_batch["teacher_scores"] = ids, scores

        self.start_training(cfg, params, mesh, len(data.train_questions))

        self.encodings: list[tuple[int, str]] = []  # (step, why): every corpus encoding
        self.refresh = make_refresh(
            cfg,
            encoder=encoder,
            layout=self.layout,
            mesh=mesh,
            encode=self._encode,
            passage_params=encoder.tower_params(self.state.params, "passage"),
            passage_tables=self.passage_tables,
            corpus_hash=self.corpus_hash,
            total_steps=self.total_steps,
        )
        in_shardings = (
            self.shardings,
            batch_shardings(mesh, self.batch_at(0)),
            jax.tree.map(lambda x: x.sharding, self.refresh.index),
            jax.tree.map(lambda _: row_sharding(mesh), self.passage_tables),
            jax.tree.map(lambda _: row_sharding(mesh), self.teacher_tables),
            jax.tree.map(lambda x: x.sharding, self.teacher_params),
        )
        in_shardings += self.refresh.step_in_shardings()
        self.step_fn = art.make_train_step(
            encoder,
            self.optimizer,
            self.art_cfg,
            mesh,
            in_shardings,
            self.teacher,
            self.refresh.fused_update,
        )
        # Compiled now, against the index's shape: before the index (and the first
        # evaluation's encoding) takes its memory, and refused here if it cannot fit.
        self.step_fn = compile_ahead(
            self.step_fn,
            (self.state, self.batch_at(0), *self._step_inputs(), *self.refresh.step_args()),
            "the ART train step",
            "use more devices (fewer rows each), a smaller train.batch_size or art.top_k, "
            "model.remat=both, encode.index_dtype=bfloat16, or teacher.param_sharding=fsdp",
        )

    # -- pieces ----------------------------------------------------------------------------

    def _setup_t5_teacher(self) -> None:
        cfg, data = self.cfg, self.data
        tspec = teacher_spec(cfg)
        # Sharded as it is read: each process loads only its devices' blocks.
        teacher = t5_teacher.T5Teacher.from_pretrained(
            cfg.teacher.model, cfg.teacher.dtype, tspec, self.mesh, cfg.teacher.param_sharding
        )
        self.teacher = dataclasses.replace(teacher, remat=cfg.teacher.get("remat", False))
        self.teacher_params = teacher.params
        ttok = teacher.tokenizer
        t_table = self.tables["teacher"]
        self.teacher_tables = tables_on_device(t_table, self.layout, self.mesh, ("input_ids",))
        trunc = Truncation("training questions (teacher)", tspec.max_question_length)
        self.host_batch["target"] = t5_teacher.tokenize_questions(
            ttok, data.train_questions, tspec, trunc
        )
        trunc.report(log)

    def _encode(
        self, passage_params: Any, step: int, why: str, donor: ShardedIndex | None
    ) -> ShardedIndex:
        """The corpus encoded on the devices with `passage_params` (donor's memory reused)."""
        cfg = self.cfg
        tower = tower_of(self.encoder, passage_params)
        if donor is None:
            donor = empty_index(self.layout, self.mesh, self.encoder.dim, cfg.encode.index_dtype)
        t0 = time.perf_counter()
        fingerprint = {"corpus_hash": self.corpus_hash, "encoder": {"step": int(step)}}
        index = refresh_in_slices(
            self.encoder,
            tower,
            self.passage_tables,
            donor,
            cfg.encode.device_batch,
            fingerprint,
            self.check_stop,
            cfg.encode.get("calls_per_slice", 16),
        )
        index.embeddings.block_until_ready()
        self.encodings.append((step, why))
        log.info("encoded the corpus (%s, step %d) in %.1fs", why, step, time.perf_counter() - t0)
        return index

    def batch_at(self, step: int) -> dict[str, Any]:
        """This process's rows of global batch `step`, assembled into global arrays."""
        cfg = self.cfg
        questions = np.arange(len(self.data.train_questions))
        idx = epoch_batch(questions, step, cfg.train.batch_size, [cfg.seed])
        mine = idx[process_rows(cfg.train.batch_size)]
        local = jax.tree.map(lambda a: np.asarray(a)[mine], self.host_batch)
        return global_batch(local, self.mesh, DATA)

    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        self.refresh.ensure(state)
        return self.refresh.train_step(self.step_fn, state, (batch, *self._step_inputs()))

    def _step_inputs(self) -> tuple:
        """The train step's arguments after the state and the batch, but the refresh's own
        (`refresh.step_args`, which `refresh.train_step` adds)."""
        return (self.refresh.index, self.passage_tables, self.teacher_tables, self.teacher_params)

    def after_step(self, state: Any, done: int) -> dict[str, float] | None:
        """The index refresh of `art.refresh` (refresh.py), and the encodings it logged."""
        return {**self.refresh.after_step(state, done), **(self._flush_events() or {})}

    def _flush_events(self) -> dict[str, float] | None:
        if not self.encodings:
            return None
        events = {f"index_{why}": float(step) for step, why in self.encodings}
        events["index_encodings"] = float(len(self.encodings))
        self.encodings = []
        return events

    def aux(self) -> Any:
        return self.refresh.aux()

    def rows(self) -> Rows | None:
        return self.refresh.rows()

    def aux_meta(self) -> dict[str, Any]:
        return self.refresh.aux_meta()

    def restore_aux(self, aux: Any, meta: dict[str, Any]) -> None:
        self.refresh.restore(aux, meta)

    def evaluate_params(
        self, params: Any, data: ev.EvalData, step: int, index: ShardedIndex
    ) -> dict[str, float]:
        q = self._encode_queries(params, data)
        scores, rows = ev.search_index(
            index, q, data.query_ids, data.corpus.ids, 100, self.cfg.encode.batch_size
        )
        matching = ev.match_answers(data, rows, matcher=self.answer_matcher)
        return ev.compute_metrics(data, scores, rows, matching and matching.result())

    def _encode_queries(self, params: Any, data: ev.EvalData) -> np.ndarray:  # [Q, d]
        batch = self.cfg.encode.batch_size
        return ev.encode_queries(
            self.encoder, params, self.tokenizer, data.query_texts, self.mesh, batch, False
        )

    def _eval_mode(self) -> str:
        mode = self.cfg.eval.get("index", "training")
        if mode not in ("training", "fresh"):
            raise ConfigError(f"eval.index={mode!r}; expected 'training' or 'fresh'")
        return mode

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """Dev metrics of the current parameters.

        eval.index = "training" (default): on the training index as it is — no stall and no
        second index; how old its rows are is reported (rolling: per-row staleness; sync:
        `index_age`, 0 when evaluation falls on a refresh step). "fresh": on a scratch index
        of the current parameters (exact, but a whole-corpus encoding and a second index of
        the same size on the devices)."""
        self.refresh.ensure(state)
        mode = self._eval_mode()
        age = self.refresh.age(step)  # how old the training index's rows are
        if self.refresh.fresh_at(step) or mode == "training":
            result = self.evaluate_params(state.params, self.data.dev, step, self.refresh.index)
            return {**result, **age}
        passage = self.encoder.tower_params(state.params, "passage")
        scratch = self._encode(passage, step, "evaluation", None)
        result = self.evaluate_params(state.params, self.data.dev, step, scratch)
        scratch.embeddings.delete()
        return {**result, **age}

    def evaluation(self, state: Any, step: int) -> Generator[None, None, dict[str, float]]:
        """`evaluate` on the training index spread over steps: the dev queries are encoded
        now with these parameters, each following step searches one of `eval.slices`
        slices of them (⌈Q / slices⌉ queries, in calls of at most `encode.batch_size`) in the
        training index as it is then — a stall of 1/slices of the search instead of all of
        it (the search grows with the corpus: at NQ's 21M rows it dominates) — and the
        answers in each slice's passages are matched by `eval.answer_workers` processes
        while the following steps run (DPR's matching of NQ dev's 0.9M passages: minutes of
        Python). With one slice and no workers, all of it at once."""
        slices = int(self.cfg.eval.get("slices", 1))
        if slices < 1:
            raise ConfigError(f"eval.slices={slices}; expected an integer ≥ 1")
        at_once = slices == 1 and self.answer_matcher.workers == 0
        if at_once or self._eval_mode() == "fresh":
            yield from ()
            return self.evaluate(state, step)
        self.refresh.ensure(state)
        age = self.refresh.age(step)
        data = self.data.dev
        q = self._encode_queries(state.params, data)  # [Q, d]
        per_slice = -(-len(q) // min(slices, len(q)))
        found, matching = [], []
        for start in range(0, len(q), per_slice):
            if slices > 1:  # each slice after one more step (the first: after the next)
                yield
            part = slice(start, start + per_slice)
            scores, rows = ev.search_index(
                self.refresh.index,  # read now: a rolling step replaces it
                q[part],
                data.query_ids[part],
                data.corpus.ids,
                100,
                # no larger a program than the evaluation at once runs (NQ's 8,757 dev
                # questions in 8 slices would be 1,095 queries × each row chunk)
                min(per_slice, self.cfg.encode.batch_size),
            )
            found.append((scores, rows))
            matching.append(ev.match_answers(data, rows, part, self.answer_matcher))
        while not self._matched(matching):
            yield
        scores = np.concatenate([f[0] for f in found])
        rows = np.concatenate([f[1] for f in found])
        hits = None if data.answers is None else np.concatenate([m.result() for m in matching])
        return {**ev.compute_metrics(data, scores, rows, hits), **age}

    def _matched(self, matching: list[qa.Matching | None]) -> bool:
        """Whether every process's answer matching is done (all take the same branch: one
        flag gathered from each while it runs; none with workers = 0, all done at once)."""
        if self.answer_matcher.workers == 0 or all(m is None for m in matching):
            return True  # (every process has the same dev set)
        mine = all(m is None or m.done(timeout=0.01) for m in matching)
        if jax.process_count() == 1:
            return mine
        return bool(multihost_utils.process_allgather(np.int32(mine)).all())

    def finish(self, state: Any) -> dict[str, Any]:
        """The test split once, after training (and with the initial parameters); the
        training index's memory is reused for both encodings."""
        if self.data.test is None or not self.cfg.eval.test_at_end:
            return {}
        out = {}
        refresh = self.refresh
        refresh.ensure(state)
        passage = self.encoder.tower_params(state.params, "passage")
        total = self.total_steps
        if not refresh.fresh_at(total):
            refresh.replace(self._encode(passage, total, "test", refresh.index), total)
        out["test_after"] = self.evaluate_params(state.params, self.data.test, total, refresh.index)
        if self.cfg.eval.get("test_baseline", True):
            base = self.baseline_params()
            baseline = self.encoder.tower_params(base, "passage")
            refresh.replace(self._encode(baseline, 0, "baseline", refresh.index), None)
            out["test_before"] = self.evaluate_params(base, self.data.test, 0, refresh.index)
        return out

    def fingerprints(self) -> dict[str, Any]:
        data = self.data
        return {
            "corpus": self.corpus_hash,
            "train_questions": _hash_texts(data.train_questions),
            "dev_questions": _hash_texts(data.dev.query_texts),
        }

    def summary(self) -> dict[str, Any]:
        return {"index": self.refresh.index, "index_step": self.refresh.index_step}


train = ArtRun.train
