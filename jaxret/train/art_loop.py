"""The ART training loop: refresh the index, step, evaluate, checkpoint, log, resume.

Exact resume: the data position is the step; the index is rebuilt from the passage-tower
parameters of the last refresh, which the checkpoint keeps; everything random derives
from the seed and the step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxret.configlib import ConfigError
from jaxret.data.corpus_store import TokenTable, open_table, tokenizer_fingerprint
from jaxret.data.tokenization import Truncation, tokenize_queries
from jaxret.eval import evaluate as ev
from jaxret.index.encode import encode_corpus, passage_table
from jaxret.index.gather import device_table
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.index.sharded import ShardedIndex
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, initialize_distributed, make_mesh
from jaxret.parallel.partitioning import param_shardings
from jaxret.recipes import art
from jaxret.teachers import t5_teacher
from jaxret.train import checkpoint as ckpt
from jaxret.train.art_data import ArtData, batch_indices, load_art_data, sparse_teacher_table
from jaxret.train.optim import make_optimizer, schedule

log = logging.getLogger(__name__)
DATA = PartitionSpec("data")


class Logger:
    """metrics.jsonl + TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():  # drop what the interrupted run logged after its checkpoint
            kept = [r for r in self.read() if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()


def plot(workdir: Path, rows: list[dict], metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    dev = [r for r in rows if r["kind"] == "dev" and metric in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = [r["step"] for r in train], np.array([r["loss"] for r in train])
    a.plot(steps, loss, lw=0.6, alpha=0.4, label="per step")
    window = max(1, min(20, len(loss) // 5))
    if window > 1:  # per-step KL is noisy at small batches: show a moving average too
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        a.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    a.legend()
    a.set(xlabel="step", ylabel="KL loss", title="training loss")
    b.plot([r["step"] for r in dev], [r[metric] for r in dev], marker="o")
    b.set(xlabel="step", ylabel=metric, title=f"dev {metric}")
    fig.tight_layout()
    out = workdir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _tables_on_device(
    table: TokenTable, layout: RowLayout, mesh: Mesh, keys: tuple[str, ...]
) -> dict:
    """The table's own compact dtype (uint16 for 30k/32k vocabularies) on the devices."""
    return {
        k: device_table(lambda s, e, k=k: table.rows(s, e)[k], layout, mesh, table.arrays[k].dtype)
        for k in keys
    }


def encode_index(
    encoder: de.DualEncoder,
    params: Any,
    table: TokenTable,
    mesh: Mesh,
    cfg: Any,
    step: int,
    corpus_hash: str = "",
) -> ShardedIndex:
    e = cfg.encode
    return encode_corpus(
        encoder,
        params,
        table,
        mesh,
        e.batch_size,
        e.index_dtype,
        e.chunk_rows,
        corpus_hash=corpus_hash,
        step=step,
        desc=None,
    )


def evaluate(
    encoder: de.DualEncoder,
    params: Any,
    tokenizer: Any,
    data: Any,
    table: TokenTable,
    mesh: Mesh,
    cfg: Any,
    step: int,
    index: ShardedIndex | None = None,
) -> tuple[dict[str, float], ShardedIndex]:
    """Metrics of `params` on `data`; `index`, when given, must come from these parameters."""
    if index is None:
        index = encode_index(encoder, params, table, mesh, cfg, step)
    q = ev.encode_queries(
        encoder, params, tokenizer, data.query_texts, mesh, cfg.encode.batch_size, False
    )
    scores, rows = ev.search_index(
        index, q, data.query_ids, data.corpus.ids, 100, cfg.encode.batch_size
    )
    return ev.compute_metrics(data, scores, rows), index


def train(cfg: Any, workdir: str | Path) -> dict[str, Any]:
    if not cfg.model.name:
        raise ConfigError(
            "model.name is empty: give the retriever to start from with "
            "--config.model.name=CHECKPOINT (an HF BERT or MegatronBERT folder, a hub id, or a "
            "jaxret export)"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    initialize_distributed(cfg.get("distributed"))
    mesh = make_mesh(tuple(cfg.mesh.axes), tuple(cfg.mesh.shape))
    t_setup = time.perf_counter()

    data: ArtData = load_art_data(cfg.data)
    spec = de.EncoderSpec.from_config(cfg.model)
    encoder, params, tok_folder = de.from_pretrained(
        cfg.model.name, spec, cfg.model.passage_name or None, jax.random.key(cfg.seed)
    )
    from jaxret.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tok_folder)
    if tokenizer.pad_token_id != 0:
        raise ValueError(
            f"the retriever tokenizer pads with id {tokenizer.pad_token_id}; the ART step derives "
            "attention masks from pad id 0 (BERT's and T5's)"
        )
    store = Path(cfg.data.store) if cfg.data.store else workdir / "store"
    p_table = passage_table(store, data.corpus, encoder, tokenizer)
    p_table.truncation("retriever passages").report(log)
    corpus_hash = data.corpus.content_hash()
    layout = RowLayout.for_mesh(len(data.corpus), mesh, cfg.encode.chunk_rows)
    # Only HF sentence pairs carry token types; every other format has all-zero type ids.
    keys = ("input_ids", "token_type_ids") if spec.passage_format == "hf_pair" else ("input_ids",)
    passage_tables = _tables_on_device(p_table, layout, mesh, keys)

    art_cfg = art.ArtConfig(
        top_k=min(cfg.art.top_k, len(data.corpus)),
        temperature_multiplier=cfg.art.temperature_multiplier,
        teacher=cfg.teacher.kind,
        teacher_temperature=cfg.teacher.temperature,
        dropout=cfg.art.dropout,
    )
    # Per training question, everything a batch needs, prepared once on the host.
    q_trunc = Truncation("training questions (retriever)", spec.max_query_length)
    q_tokens = tokenize_queries(
        tokenizer, data.train_questions, spec.max_query_length, truncation=q_trunc
    )
    q_trunc.report(log)
    host_batch: dict[str, Any] = {"query": q_tokens}
    teacher, teacher_params, teacher_tables = None, None, {}
    if art_cfg.teacher == "t5":
        tspec = t5_teacher.TeacherSpec(
            max_passage_length=cfg.teacher.max_passage_length,
            max_question_length=cfg.teacher.max_question_length,
            chunk_pairs=cfg.teacher.chunk_pairs,
        )
        teacher = t5_teacher.T5Teacher.from_pretrained(cfg.teacher.model, cfg.teacher.dtype, tspec)
        ttok = teacher.tokenizer

        def t5_tokenize(
            titles: list[str], texts: list[str], trunc: Truncation
        ) -> dict[str, np.ndarray]:
            return t5_teacher.tokenize_passages(ttok, titles, texts, tspec, trunc)

        fp = {
            "tokenizer": tokenizer_fingerprint(ttok),
            "vocab_size": len(ttok),
            "max_length": tspec.max_passage_length,
            "verbalizer": tspec.verbalize("{t}", "{x}"),
        }
        t_table = open_table(store, "teacher", data.corpus, t5_tokenize, fp)
        t_table.truncation("teacher passages").report(log)
        teacher_tables = _tables_on_device(t_table, layout, mesh, ("input_ids",))
        target_trunc = Truncation("training questions (teacher)", tspec.max_question_length)
        host_batch["target"] = t5_teacher.tokenize_questions(
            ttok, data.train_questions, tspec, target_trunc
        )
        target_trunc.report(log)
        teacher_params = jax.device_put(
            teacher.params, param_shardings(teacher.params, mesh, cfg.teacher.param_sharding)
        )
    else:
        host_batch["teacher_ids"], host_batch["teacher_scores"] = sparse_teacher_table(
            data, art_cfg.teacher, cfg.teacher
        )

    total = int(cfg.train.steps) or int(cfg.train.epochs) * max(
        1, len(data.train_questions) // cfg.train.batch_size
    )
    optimizer = make_optimizer(cfg.optimizer, total)
    lr_at = schedule(cfg.optimizer.lr, total, cfg.optimizer.warmup_fraction)
    state = art.init_state(params, optimizer, cfg.seed)
    shardings = art.state_shardings(state, mesh, cfg.mesh.param_sharding)
    state = jax.device_put(state, shardings)
    # A copy: the train step donates (and so deletes) the state's buffers.
    index_params = _copy(encoder.tower_params(state.params, "passage"))
    index_step = 0

    manager = ckpt.Manager(workdir / "checkpoints", cfg.train.keep_checkpoints)
    meta: dict[str, Any] = {"best": None, "index_step": 0}
    resumed = manager.latest_step()
    if resumed is not None:
        abstract_index = jax.tree.map(lambda x: x, index_params)
        state, index_params, meta = manager.restore(resumed, state, abstract_index)
        index_step = meta["index_step"]
        log.warning("resumed from step %d (index built at step %d)", resumed, index_step)
    start = int(jax.device_get(state.step))
    logger = Logger(workdir, start)

    def build_index(p_params: Any, at_step: int) -> ShardedIndex:
        tower_params = {"shared": p_params} if spec.shared else {"passage": p_params}
        return encode_index(encoder, tower_params, p_table, mesh, cfg, at_step, corpus_hash)

    index = build_index(index_params, index_step)
    batch_sharding = NamedSharding(mesh, DATA)
    example = _make_batch(host_batch, 0, len(data.train_questions), cfg, mesh)
    in_shardings = (
        shardings,
        jax.tree.map(lambda _: batch_sharding, example),
        jax.tree.map(lambda x: x.sharding, index),
        jax.tree.map(lambda _: row_sharding(mesh), passage_tables),
        jax.tree.map(lambda _: row_sharding(mesh), teacher_tables),
        jax.tree.map(lambda x: x.sharding, teacher_params),
    )
    train_step = art.make_train_step(encoder, optimizer, art_cfg, mesh, in_shardings, teacher)
    metric_name = cfg.eval.metric

    if start == 0 and cfg.eval.at_start:
        # The training index was just built from these very parameters.
        base, _ = evaluate(encoder, state.params, tokenizer, data.dev, p_table, mesh, cfg, 0, index)
        logger.write(0, "dev", base)
    log.info("setup took %.1fs", time.perf_counter() - t_setup)

    bar = tqdm(total=total, initial=start, desc="ART", unit="step", disable=not cfg.train.progress)
    eval_cache: tuple[int, ShardedIndex] | None = None
    losses: list[float] = []
    for step in range(start, total):
        if step > 0 and step % cfg.train.refresh_every == 0 and index_step != step:
            if eval_cache is not None and eval_cache[0] == step:
                index = eval_cache[1]  # the evaluation just encoded the corpus with these params
            else:
                index = build_index(encoder.tower_params(state.params, "passage"), step)
            index_params, index_step = _copy(encoder.tower_params(state.params, "passage")), step
        batch = _make_batch(host_batch, step, len(data.train_questions), cfg, mesh)
        state, metrics = train_step(
            state, batch, index, passage_tables, teacher_tables, teacher_params
        )
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["lr"] = float(lr_at(step))
        losses.append(values["loss"])
        logger.write(step + 1, "train", values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        done = step + 1
        if done % cfg.train.eval_every == 0 or done == total:
            result, fresh = evaluate(
                encoder, state.params, tokenizer, data.dev, p_table, mesh, cfg, done
            )
            eval_cache = (done, fresh)
            logger.write(done, "dev", result)
            value = result.get(metric_name)
            if value is not None and (meta["best"] is None or value > meta["best"]["value"]):
                meta["best"] = {"step": done, "value": value, "metric": metric_name}
                manager.save_best(state.params, meta["best"])
        if done % cfg.train.checkpoint_every == 0 or done == total:
            meta["index_step"] = index_step
            manager.save(done, state, index_params, meta)
    bar.close()
    manager.wait()

    summary: dict[str, Any] = {"steps": total, "final_step_loss": losses[-1] if losses else None}
    if data.test is not None and cfg.eval.test_at_end:
        baseline = jax.device_put(params, shardings.params)
        before, _ = evaluate(encoder, baseline, tokenizer, data.test, p_table, mesh, cfg, 0)
        final = eval_cache[1] if eval_cache is not None and eval_cache[0] == total else None
        after, _ = evaluate(
            encoder, state.params, tokenizer, data.test, p_table, mesh, cfg, total, final
        )
        summary.update(test_before=before, test_after=after)
        logger.write(total, "test", after)
    if jax.process_index() == 0:
        de.export(encoder, state.params, workdir / "export", tokenizer)
        summary["plot"] = str(plot(workdir, logger.read(), metric_name))
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    summary["params"] = state.params
    summary["index"] = index
    return summary


def _make_batch(host: dict[str, Any], step: int, n: int, cfg: Any, mesh: Mesh) -> dict[str, Any]:
    """This process's rows of global batch `step`, assembled into global arrays."""
    idx = batch_indices(step, n, cfg.train.batch_size, cfg.seed)
    per_process = cfg.train.batch_size // jax.process_count()
    mine = idx[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
    local = jax.tree.map(lambda a: np.asarray(a)[mine], host)
    return global_batch(local, mesh, DATA)


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)
