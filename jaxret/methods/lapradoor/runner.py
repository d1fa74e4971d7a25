"""LaPraDoR pretraining on the shared loop: ICT pairs from a corpus, ICoL steps, LEDR at the end.

Data (Xu et al., §3.2): every step draws passages (a seeded permutation per epoch); for each,
a random sentence is the query and the rest of the passage the document (ICT); DaPI needs no
data of its own (a second dropout pass of the same input). The step is methods.lapradoor.step.
There are no labels and no dev set in pretraining: the final export is the last step, and
`finish` reports the evaluation corpora's test queries before and after, with the dense
model alone and with LEDR (cosine × BM25).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax

from jaxret.configlib import ConfigError
from jaxret.data import sentences as sent
from jaxret.data.corpus_store import SHARD_ROWS
from jaxret.data.corpus_text import training_corpus
from jaxret.data.tokenization import tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.eval import hybrid
from jaxret.methods.lapradoor import step as icol
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, mesh_from_config
from jaxret.parallel.axes import DATA
from jaxret.parallel.host_data import place
from jaxret.train import state as train_state
from jaxret.train.batching import epoch_batch, process_rows
from jaxret.train.loop import Runner
from jaxret.train.optim import make_optimizer, schedule, total_steps
from jaxret.train.setup import batch_shardings, load_retriever, prepare_hint, store_folder
from jaxret.train.state import compile_ahead

log = logging.getLogger(__name__)


def corpus_dirs(cfg: Any) -> list[str]:
    dirs = [d for d in cfg.data.dir.split(",") if d]
    if not dirs:
        raise ConfigError(
            "data.dir is empty: the corpora to pretrain on (comma-separated data folders "
            "or corpus files; no queries needed)"
        )
    return dirs


def prepare(
    cfg: Any, workdir: str | Path, workers: int, shard_rows: int = SHARD_ROWS
) -> dict[str, Any]:
    """`jaxret prepare` for LaPraDoR: the corpora's text tables and the sentences per
    passage (which passages ICT can pair), built before the job by `workers` processes; a
    multi-process run refuses to start without them. Loads no weights."""
    store = store_folder(cfg, workdir)
    corpus = training_corpus(corpus_dirs(cfg), store, write=True)
    table = sent.sentence_table(store, corpus, cfg.data.splitter, workers, shard_rows)
    sent.rows_with_sentences(table)  # ICT's passages, memory-mapped by every process
    return {"sentences": table}


def icol_config(cfg: Any) -> icol.IcolConfig:
    names = {f.name for f in dataclasses.fields(icol.IcolConfig)}
    return icol.IcolConfig(**{k: v for k, v in dict(cfg.icol).items() if k in names})


class LapradoorRun(Runner):
    name = "LaPraDoR"
    loss_label = "ICoL loss"

    def __init__(self, cfg: Any, workdir: Path):
        if not cfg.model.name:
            raise ConfigError("model.name is empty: the BERT checkpoint both towers start from")
        dirs = corpus_dirs(cfg)
        self.cfg = cfg
        self.mesh = mesh = mesh_from_config(cfg, {"train.batch_size": cfg.train.batch_size})
        # Pretraining reads corpora only (memory-mapped from the store when prepared); the
        # evaluation sets are their own folders.
        store = store_folder(cfg, workdir)
        self.corpus = training_corpus(dirs, store)
        eval_dirs = [d for d in cfg.data.get("eval_dir", "").split(",") if d]
        self.eval_sets = [ev.load_eval_data(d, cfg.data.eval_split) for d in eval_dirs]
        spec = dataclasses.replace(de.EncoderSpec.from_config(cfg.model), shared=False)
        self.encoder, params, self.tokenizer = load_retriever(cfg, mesh, spec)
        # ICoL's similarity is the model's (model.scale × cosine), as evaluation scores it.
        self.icol = dataclasses.replace(icol_config(cfg), scale=self.encoder.logit_scale)
        self.split = sent.splitter(cfg.data.splitter, "en")
        counts = sent.sentence_table(
            store,
            self.corpus,
            cfg.data.splitter,
            multi_process="refuse",
            prepare_hint=prepare_hint(store),
        )
        self.eligible = sent.rows_with_sentences(counts)  # memory-mapped
        if not len(self.eligible):
            raise ConfigError("no passage has two sentences: ICT has nothing to pair")
        log.info(
            "ICT: %d of %d passages have two or more sentences",
            len(self.eligible),
            len(self.corpus),
        )

        t = cfg.train
        self.total_steps = total_steps(t, len(self.eligible))
        # Each tower's optimizer gives a direction (learning rate 1); the step scales it by the
        # schedule of the global step, so a tower's schedule does not pause while it is frozen.
        self.optimizer = make_optimizer(cfg.optimizer, self.total_steps, learning_rate=1.0)
        opt = cfg.optimizer
        self.lr_at = schedule(
            opt.lr, self.total_steps, opt.warmup_fraction, opt.get("warmup_steps", 0)
        )
        queue = icol.init_queue(self.icol, self.encoder.dim, mesh)
        state = icol.init_state(params, self.optimizer, cfg.seed, jax.device_get(queue))
        shardings = train_state.state_shardings(
            state, mesh, cfg.mesh.param_sharding, icol.queue_shardings(mesh)
        )
        self.shardings = shardings
        self.state = place(state, shardings)
        self.initial_params = params
        example = self.batch_at(0)
        in_shardings = (shardings, batch_shardings(mesh, example))
        self.step_fn = compile_ahead(
            icol.make_train_step(
                self.encoder, self.optimizer, self.lr_at, self.icol, mesh, in_shardings
            ),
            (self.state, example),
            "the LaPraDoR train step",
            "a smaller train.batch_size or icol.queue_size, model.remat=both, "
            "mesh.param_sharding=fsdp, or more devices",
        )

    def batch_at(self, step: int) -> dict[str, Any]:
        """ICT pairs of global batch `step`, a function of the seed and the step only."""
        cfg = self.cfg
        b = cfg.train.batch_size
        idx = epoch_batch(self.eligible, step, b, [cfg.seed, 4])[process_rows(b)]
        queries, docs = sent.ict_pairs(
            self.split, self.corpus.texts, idx, [cfg.seed, 5, step], cfg.data.ict_remove_prob
        )
        spec = self.encoder.spec
        local = {
            "query": tokenize_queries(self.tokenizer, queries, spec.max_query_length),
            "document": tokenize_queries(self.tokenizer, docs, spec.max_passage_length),
        }
        return global_batch(local, self.mesh, DATA)

    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        return self.step_fn(state, batch)

    def final_towers(self, params: dict) -> dict:
        """The export: both towers, or with `shared` the tower that trained last."""
        if not self.icol.shared:
            return params
        last = icol.TOWERS[int((self.total_steps - 1) // self.icol.switch_every) % 2]
        return {"shared": params[last]}

    def _evaluate(self, params: dict) -> dict[str, Any]:
        out = {}
        encoder = self.encoder
        if self.icol.shared:
            encoder = dataclasses.replace(
                encoder, spec=dataclasses.replace(encoder.spec, shared=True)
            )
        n = self.cfg.eval.get("max_length", 0)
        if n:  # LaPraDoR's evaluation lengths (hybrid.LEDR_MAX_LENGTH), within the positions
            n = min(n, encoder.bert.max_position_embeddings)
            spec = dataclasses.replace(encoder.spec, max_query_length=n, max_passage_length=n)
            encoder = dataclasses.replace(encoder, spec=spec)
        model = (encoder, params, self.tokenizer)
        for data in self.eval_sets:
            data = ev.subsample(data, self.cfg.data.max_eval_queries or None, None, self.cfg.seed)
            scores, rows = ev.dense_search(
                encoder,
                params,
                self.tokenizer,
                data,
                self.mesh,
                100,
                self.cfg.encode.batch_size,
                progress=False,
            )
            dense = ev.compute_metrics(data, scores, rows)
            bm25 = dataclasses.replace(
                hybrid.LEDR_BM25, analyzer=self.cfg.eval.get("bm25_analyzer", "english")
            )
            l_scores, l_rows, _ = hybrid.ledr_retrieval(
                model, data, self.mesh, self.cfg.eval.bm25_depth, bm25_config=bm25
            )
            led = ev.compute_metrics(data, l_scores, l_rows)
            out[data.name] = {
                "dense_ndcg@10": dense.get("ndcg@10"),
                "ledr_ndcg@10": led.get("ndcg@10"),
            }
        return out

    def finish(self, state: Any) -> dict[str, Any]:
        if not self.cfg.eval.test_at_end:
            return {}
        if not self.eval_sets:
            log.info("no data.eval_dir: nothing to evaluate before / after")
            return {}
        before = self._evaluate(
            self.final_towers(place(self.initial_params, self.shardings.params))
        )
        after = self._evaluate(self.final_towers(state.params))
        return {"per_set_before": before, "per_set_after": after}

    def export(self, params: Any, folder: Path) -> None:
        encoder = self.encoder
        towers = self.final_towers(params)
        if self.icol.shared:
            encoder = dataclasses.replace(
                encoder, spec=dataclasses.replace(encoder.spec, shared=True)
            )
        de.export(encoder, towers, folder, self.tokenizer)

    def fingerprints(self) -> dict[str, Any]:
        return {"corpus": self.corpus.content_hash()}


train = LapradoorRun.train
