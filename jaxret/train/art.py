"""ART on the shared loop: data, device-resident corpus, index refresh, teacher, evaluation.

What the loop gets from here (jaxret.train.loop.Recipe):
  train_step   recipes.art's jitted step, closed over the current index, the token tables
               and the teacher;
  after_step   art.refresh = "sync" (the paper's): the index re-encoded every
               `train.refresh_every` steps, on the devices (index.rolling.refresh_in_slices:
               the passage tower over the device token tables in slices, the old index's
               memory donated to the new one, a SIGTERM seen between slices). It runs
               before the loop's checkpoint of that step, so a resume rebuilds the index
               once and never twice.
               art.refresh = "rolling": after every step each device re-encodes its next
               slice of rows in place (index.rolling), so training never stalls; a cycle of
               `refresh_every` steps encodes the corpus once. art.rolling_program = "fused"
               does it inside the train step (one program; after_step only logs it),
               "separate" as a second program dispatched here;
  aux          sync: the passage-tower parameters that built the current index (a resume
               rebuilds exactly that index); rolling: the index itself and its per-row
               staleness record (each process writes its rows), so a resume is exact;
  evaluate     dev top-k accuracy or nDCG@10 / Recall@100 with a fresh index of the current
               parameters (the training index when it is fresh);
  finish       the test split, before (the initial parameters) and after training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxret.configlib import ConfigError
from jaxret.data.corpus_store import SHARD_ROWS, TokenTable, open_table, tokenizer_fingerprint
from jaxret.data.corpus_text import stored_corpus, write_text_table
from jaxret.data.readers import find_corpus, read_corpus
from jaxret.data.tokenization import Truncation, load_tokenizer, tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.index.encode import empty_index, passage_table, tables_on_device, token_keys
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.index.rolling import (
    empty_staleness,
    refresh_in_slices,
    rolling_refresher,
    rolling_update,
    staleness,
)
from jaxret.index.sharded import ShardedIndex
from jaxret.models import dual_encoder as de
from jaxret.models import hf_io
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.activations import Activations
from jaxret.parallel.host_data import place
from jaxret.recipes import art
from jaxret.teachers import t5_teacher
from jaxret.train.art_data import ArtData, load_art_data, sparse_teacher_table
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.loop import Recipe, run
from jaxret.train.optim import start_training

log = logging.getLogger(__name__)
DATA = PartitionSpec("data")


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _hash_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def store_folder(cfg: Any, workdir: str | Path) -> Path:
    """The run's token store: data.store, else WORKDIR/store."""
    return Path(cfg.data.store) if cfg.data.store else Path(workdir) / "store"


def teacher_spec(cfg: Any) -> t5_teacher.TeacherSpec:
    return t5_teacher.TeacherSpec(
        max_passage_length=cfg.teacher.max_passage_length,
        max_question_length=cfg.teacher.max_question_length,
        chunk_pairs=cfg.teacher.chunk_pairs,
    )


def open_tables(
    cfg: Any,
    corpus: Any,
    store: Path,
    tokenizer: Any,
    teacher_tokenizer: Any = None,
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
) -> dict[str, TokenTable]:
    """ART's token tables of `corpus` — the retriever's passages and, with a T5 teacher, the
    teacher's verbalized passages — opened from `store` or built there. Training with more
    than one process never builds them (`jaxret prepare` does, before the job)."""
    build = {
        "workers": workers,
        "shard_rows": shard_rows,
        "multi_process": "refuse",
        "prepare_hint": "jaxret prepare --config=<the same config and overrides> "
        f"--workdir=<the run's workdir> (store {store})",
    }
    spec = de.EncoderSpec.from_config(cfg.model)
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
    return open_tables(cfg, data.corpus, store, tokenizer, teacher_tokenizer, workers, shard_rows)


class ArtRun:
    """Everything one ART run holds besides the train state."""

    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError(
                "model.name is empty: give the retriever to start from with "
                "--config.model.name=CHECKPOINT (an HF BERT or MegatronBERT folder, a hub id, "
                "or a jaxret export)"
            )
        self.cfg = cfg
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        store = store_folder(cfg, workdir)
        self.data: ArtData = load_art_data(cfg.data, store)
        data = self.data
        spec = de.EncoderSpec.from_config(cfg.model)
        encoder, params, tok_folder = de.from_pretrained(
            cfg.model.name, spec, cfg.model.passage_name or None, jax.random.key(cfg.seed)
        )
        act = Activations.for_strategy(mesh, cfg.mesh.param_sharding)
        self.encoder = encoder = encoder.with_activations(act)
        self.tokenizer = tokenizer = load_tokenizer(tok_folder)
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
        self.tables = open_tables(cfg, data.corpus, store, tokenizer, self.teacher_tokenizer)
        self.p_table = self.tables["passages"]
        self.corpus_hash = data.corpus.content_hash()
        self.layout = RowLayout.for_mesh(len(data.corpus), mesh, cfg.encode.chunk_rows)
        self.passage_tables = tables_on_device(
            self.p_table, self.layout, mesh, token_keys(spec.passage_format)
        )

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

        start = start_training(cfg, params, mesh, len(data.train_questions))
        self.total, self.optimizer, self.lr_at = start.total, start.optimizer, start.lr_at
        self.state, self.shardings = start.state, start.shardings
        self.initial_params = params  # host copy: the baseline of the final test

        self.refresh = cfg.art.get("refresh", "sync")
        if self.refresh not in ("sync", "rolling"):
            raise ConfigError(f"art.refresh={self.refresh!r}; expected 'sync' or 'rolling'")
        self.encodings: list[tuple[int, str]] = []  # (step, why): every corpus encoding
        self.index_params = _copy(encoder.tower_params(self.state.params, "passage"))
        # Encodings wait for first use (`_ensure_index`), inside the loop where a SIGTERM
        # is seen: a resume restores or re-encodes its checkpoint's index instead of the
        # start index, so it encodes the corpus once.
        self.index_step = 0
        self.pending: tuple[int, str] | None = (0, "start")
        self.index = empty_index(self.layout, mesh, encoder.dim, cfg.encode.index_dtype)
        self.check_stop: Any = None  # the loop's SIGTERM check (Recipe.bind_stop)
        self.stale, self.done, self.roll_stats = None, 0, {}
        self.program = cfg.art.get("rolling_program", "separate")
        if self.program not in ("fused", "separate"):
            raise ConfigError(
                f"art.rolling_program={self.program!r}; expected 'fused' or 'separate'"
            )
        roll_args = (encoder, mesh, self.layout, int(cfg.train.refresh_every))
        fused = self.refresh == "rolling" and self.program == "fused"
        if self.refresh == "rolling":
            self.stale = empty_staleness(self.layout, mesh)  # [N_pad]: step of each row
            if not fused:
                self.roll_fn = rolling_refresher(*roll_args, cfg.encode.device_batch)
        batch_sharding = NamedSharding(mesh, DATA)
        example = self.batch_at(0)
        in_shardings = (
            self.shardings,
            jax.tree.map(lambda _: batch_sharding, example),
            jax.tree.map(lambda x: x.sharding, self.index),
            jax.tree.map(lambda _: row_sharding(mesh), self.passage_tables),
            jax.tree.map(lambda _: row_sharding(mesh), self.teacher_tables),
            jax.tree.map(lambda x: x.sharding, self.teacher_params),
        )
        roll = None
        if fused:
            in_shardings += (row_sharding(mesh),)  # stale
            roll = rolling_update(*roll_args, cfg.encode.device_batch)
        self.step_fn = art.make_train_step(
            encoder, self.optimizer, self.art_cfg, mesh, in_shardings, self.teacher, roll
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
        tower = self._tower(passage_params)
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

    def _tower(self, passage_params: Any) -> dict[str, Any]:
        return {"shared" if self.encoder.spec.shared else "passage": passage_params}

    def batch_at(self, step: int) -> dict[str, Any]:
        """This process's rows of global batch `step`, assembled into global arrays."""
        cfg = self.cfg
        questions = np.arange(len(self.data.train_questions))
        idx = epoch_batch(questions, step, cfg.train.batch_size, [cfg.seed])
        mine = idx[process_rows(cfg.train.batch_size)]
        local = jax.tree.map(lambda a: np.asarray(a)[mine], self.host_batch)
        return global_batch(local, self.mesh, DATA)

    def _ensure_index(self, state: Any) -> None:
        """Encodes the pending index (the start's, or a resume's) with index_params (None:
        the parameters of `state`, a rolling resume from a checkpoint without its index)."""
        if self.pending is not None:
            step, why = self.pending
            params = self.index_params
            if params is None:
                params = self.encoder.tower_params(state.params, "passage")
            self.index = self._encode(params, step, why, self.index)
            self.index_step, self.pending = step, None
            if self.refresh == "rolling":
                self.index = self._rolling_index(self.index.embeddings, step)

    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        self._ensure_index(state)
        args = (batch, self.index, self.passage_tables, self.teacher_tables, self.teacher_params)
        if self.stale is None or self.program == "separate":
            return self.step_fn(state, *args)
        state, metrics, index, self.stale = self.step_fn(state, *args, self.stale)
        self.index = index
        # Reported by after_step as events, the same rows as the separate program writes.
        self.roll_stats = {k: metrics.pop(k) for k in list(metrics) if k.startswith("refresh_")}
        return state, metrics

    def after_step(self, state: Any, done: int) -> dict[str, float] | None:
        """sync: re-embeds the corpus every refresh_every steps (not after the last step);
        rolling: re-embeds this step's slice of every device's rows."""
        self.done = done
        if self.refresh == "rolling":
            return self._roll(state, done)
        if done % self.cfg.train.refresh_every or done >= self.total:
            return self._flush_events()
        self.index_params = _copy(self.encoder.tower_params(state.params, "passage"))
        self.index_step = done
        self.index = self._encode(self.index_params, done, "refresh", self.index)
        return self._flush_events()

    def _roll(self, state: Any, done: int) -> dict[str, float]:
        if self.program == "separate":
            tower = self._tower(self.encoder.tower_params(state.params, "passage"))
            emb, self.stale, stats = self.roll_fn(
                tower, self.passage_tables, self.index.embeddings, self.stale, np.int32(done)
            )
            self.roll_stats = {f"refresh_{k}": v for k, v in stats.items()}
        else:  # the train step refreshed the slice already
            emb = self.index.embeddings
        self.index = self._rolling_index(emb, done)
        self.index_step = -1  # rows of several steps: never "fresh" for evaluation
        out = {k: float(v) for k, v in jax.device_get(self.roll_stats).items()}
        return {**out, **(self._flush_events() or {})}

    def _rolling_index(self, embeddings: jax.Array, done: int) -> ShardedIndex:
        meta = {"corpus_hash": self.corpus_hash, "encoder": {"refresh": "rolling", "step": done}}
        return ShardedIndex(embeddings, self.layout, self.mesh, tuple(sorted(meta.items())))

    def _flush_events(self) -> dict[str, float] | None:
        if not self.encodings:
            return None
        events = {f"index_{why}": float(step) for step, why in self.encodings}
        events["index_encodings"] = float(len(self.encodings))
        self.encodings = []
        return events

    def aux(self) -> Any:
        # Also the restore template (before any step): the empty donor index has the shape.
        if self.refresh == "rolling":
            return {"embeddings": self.index.embeddings, "stale": self.stale}
        return self.index_params

    def aux_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"index_step": self.index_step, "refresh": self.refresh}
        if self.refresh == "rolling":
            meta["refresh_pointer"] = self.done % int(self.cfg.train.refresh_every)
        return meta

    def restore_aux(self, aux: Any, meta: dict[str, Any]) -> None:
        if self.refresh == "rolling" and aux is None:
            # An older checkpoint (its index is kept in the newest only): the whole index is
            # encoded once, with the restored parameters, and every row is that step's.
            step = int(meta["step"])
            self.index_params, self.pending, self.done = None, (step, "resume"), step
            self.stale = empty_staleness(self.layout, self.mesh, step)
            return
        if self.refresh == "rolling":  # the index itself was saved: nothing to re-encode
            self.index, self.stale = self._rolling_index(aux["embeddings"], -1), aux["stale"]
            self.index_step = int(meta.get("index_step", -1))
            self.done = int(meta["step"])
            self.pending = None
            return
        self.index_params = aux  # the index of the checkpoint, encoded on first use
        self.pending = (int(meta.get("index_step", 0)), "resume")

    def evaluate_params(
        self, params: Any, data: ev.EvalData, step: int, index: ShardedIndex
    ) -> dict[str, float]:
        cfg = self.cfg
        q = ev.encode_queries(
            self.encoder,
            params,
            self.tokenizer,
            data.query_texts,
            self.mesh,
            cfg.encode.batch_size,
            False,
        )
        scores, rows = ev.search_index(
            index, q, data.query_ids, data.corpus.ids, 100, cfg.encode.batch_size
        )
        return ev.compute_metrics(data, scores, rows)

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """Dev metrics of the current parameters.

        eval.index = "training" (default): on the training index as it is — no stall and no
        second index; how old its rows are is reported (rolling: per-row staleness; sync:
        `index_age`, 0 when evaluation falls on a refresh step). "fresh": on a scratch index
        of the current parameters (exact, but a whole-corpus encoding and a second index of
        the same size on the devices)."""
        self._ensure_index(state)
        mode = self.cfg.eval.get("index", "training")
        if mode not in ("training", "fresh"):
            raise ConfigError(f"eval.index={mode!r}; expected 'training' or 'fresh'")
        age: dict[str, float] = {}
        if self.stale is not None:  # how old the training index's rows are
            age = {f"index_{k}": v for k, v in staleness(self.stale, self.layout, step).items()}
        elif self.index_step is not None and self.index_step >= 0:
            age = {"index_age": float(step - self.index_step)}
        if self.index_step == step or mode == "training":
            result = self.evaluate_params(state.params, self.data.dev, step, self.index)
            return {**result, **age}
        passage = self.encoder.tower_params(state.params, "passage")
        scratch = self._encode(passage, step, "evaluation", None)
        result = self.evaluate_params(state.params, self.data.dev, step, scratch)
        scratch.embeddings.delete()
        return {**result, **age}

    def finish(self, state: Any) -> dict[str, Any]:
        """The test split once, after training (and with the initial parameters); the
        training index's memory is reused for both encodings."""
        if self.data.test is None or not self.cfg.eval.test_at_end:
            return {}
        out = {}
        self._ensure_index(state)
        passage = self.encoder.tower_params(state.params, "passage")
        if self.index_step != self.total:
            self.index = self._encode(passage, self.total, "test", self.index)
            self.index_step = self.total
        out["test_after"] = self.evaluate_params(
            state.params, self.data.test, self.total, self.index
        )
        if self.cfg.eval.get("test_baseline", True):
            base = place(self.initial_params, self.shardings.params)
            self.index = self._encode(
                self.encoder.tower_params(base, "passage"), 0, "baseline", self.index
            )
            self.index_step = -1
            out["test_before"] = self.evaluate_params(base, self.data.test, 0, self.index)
        return out

    def export(self, params: Any, folder: Path) -> None:
        de.export(self.encoder, params, folder, self.tokenizer)

    def recipe(self) -> Recipe:
        data = self.data
        fingerprints = {
            "corpus": self.corpus_hash,
            "train_questions": _hash_texts(data.train_questions),
            "dev_questions": _hash_texts(data.dev.query_texts),
        }
        return Recipe(
            name="ART",
            state=self.state,
            train_step=self.train_step,
            batch_at=self.batch_at,
            total_steps=self.total,
            metric=self.cfg.eval.metric,
            evaluate=self.evaluate,
            after_step=self.after_step,
            aux=self.aux,
            aux_meta=self.aux_meta,
            restore_aux=self.restore_aux,
            aux_latest_only=self.refresh == "rolling",
            export=self.export,
            finish=self.finish,
            lr_at=self.lr_at,
            fingerprints=fingerprints,
            loss_label="KL loss",
            bind_stop=self._bind_stop,
        )

    def _bind_stop(self, check: Any) -> None:
        self.check_stop = check


def train(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runner = ArtRun(cfg, workdir)
    recipe = runner.recipe()
    summary = run(cfg, recipe, workdir)
    summary["index"] = runner.index
    summary["index_step"] = runner.index_step
    summary["params"] = summary["state"].params
    return summary
