"""Frozen T5/T0 teacher: how well does each passage reconstruct the question?

As in ART and its original code: encoder input
    "Passage: " + title + " " + text + " . Please write a question based on this passage."
decoder target "Question: " + question + </s>, teacher forcing, score = MEAN log p over the
target tokens (sum available). Parameters and forward in bf16, log-softmax in fp32, and the
[pairs, T, vocab] logits exist only one chunk of pairs at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import dtypes
from jaxret.data.tokenization import Truncation
from jaxret.models.hf_t5 import load_t5, load_t5_sharded
from jaxret.models.t5 import T5, T5Config, shift_right
from jaxret.parallel.activations import Activations, map_rows, pad_rows
from jaxret.teachers import layerwise

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    passage_prefix: str = "Passage: "
    passage_suffix: str = " . Please write a question based on this passage."
    question_prefix: str = "Question: "
    max_passage_length: int = 512
    max_question_length: int = 128  # ART's collate: max_length=128, truncation=True
    reduction: Literal["mean", "sum"] = "mean"
    # Pairs per forward chunk, per device when the teacher runs sharded (every chunk spans
    # all devices); 0 = all pairs at once. Bounds the [pairs, T, vocab] logits in memory.
    chunk_pairs: int = 0

    def verbalize(self, title: str, text: str) -> str:
        return f"{self.passage_prefix}{title} {text}{self.passage_suffix}"


def _append_eos(pieces: list[list[int]], eos: int, max_length: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(pieces), max_length), np.int32)
    mask = np.zeros((len(pieces), max_length), np.int32)
    for i, p in enumerate(pieces):
        row = p[: max_length - 1] + [eos]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def passage_room(tokenizer: Any, spec: TeacherSpec) -> int:
    """Tokens left for a passage's title and text once the prompt ("Passage: " … the
    instruction … EOS) is in: a long passage is cut to this many."""
    prompt = spec.passage_prefix + spec.passage_suffix
    return (
        spec.max_passage_length - 1 - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    )


def check_passage_room(tokenizer: Any, spec: TeacherSpec, minimum: int = 32) -> None:
    """A one-line warning when the prompt leaves the passage fewer than `minimum` tokens: the
    teacher then scores mostly the instruction, and its scores barely tell passages apart
    (with none left, every passage reads the same and the loss is 0)."""
    room = passage_room(tokenizer, spec)
    if room < minimum:
        log.warning(
            "teacher.max_passage_length=%d leaves %d tokens of passage after the %d-token "
            "prompt: the teacher's scores will barely depend on the passage; raise "
            "--config.teacher.max_passage_length",
            spec.max_passage_length,
            max(room, 0),
            spec.max_passage_length - 1 - room,
        )


def tokenize_passages(
    tokenizer: Any,
    titles: list[str],
    texts: list[str],
    spec: TeacherSpec,
    truncation: Truncation | None = None,
) -> dict[str, np.ndarray]:
    """[N, max_passage_length] ids/mask, EOS-terminated as T5's tokenizer does. A passage too
    long keeps its instruction suffix: the passage body is cut, never the prompt (as in ART's
    `postprocess`). `truncation` counts the rows cut."""
    full = [spec.verbalize(t, x) for t, x in zip(titles, texts)]
    pieces = tokenizer(full, add_special_tokens=False)["input_ids"]
    if truncation is not None:
        truncation.add([len(p) + 1 for p in pieces])
    long = [i for i, p in enumerate(pieces) if len(p) > spec.max_passage_length - 1]
    if long:
        suffix = tokenizer(spec.passage_suffix, add_special_tokens=False)["input_ids"]
        bodies = tokenizer(
            [f"{spec.passage_prefix}{titles[i]} {texts[i]}" for i in long], add_special_tokens=False
        )["input_ids"]
        room = spec.max_passage_length - 1 - len(suffix)
        if room < 1:
            raise ValueError(
                f"max_passage_length={spec.max_passage_length} cannot hold the instruction "
                f"({len(suffix)} tokens) plus any passage"
            )
        for i, body in zip(long, bodies):
            pieces[i] = body[:room] + suffix
    return _append_eos(pieces, tokenizer.eos_token_id, spec.max_passage_length)


def tokenize_questions(
    tokenizer: Any,
    questions: list[str],
    spec: TeacherSpec,
    truncation: Truncation | None = None,
    batch_size: int = 4096,
) -> dict[str, np.ndarray]:
    """Decoder targets [B, max_question_length]: "Question: q" + EOS (labels, label mask).
    A longer question is cut, EOS kept (ART: the T0 tokenizer with truncation=True).
    Tokenized `batch_size` at a time: a fast tokenizer's encodings of one call stay in memory
    together (~15 KB per question: 20k questions in one call held 350 MB; NQ has 79k)."""
    pieces = []
    for start in range(0, len(questions), batch_size):
        batch = [spec.question_prefix + q for q in questions[start : start + batch_size]]
        pieces += tokenizer(batch, add_special_tokens=False)["input_ids"]
    if truncation is not None:
        truncation.add([len(p) + 1 for p in pieces])
    out = _append_eos(pieces, tokenizer.eos_token_id, spec.max_question_length)
    return {"labels": out["input_ids"], "label_mask": out["attention_mask"]}


def token_logprobs(
    model: T5,
    params: Any,
    input_ids: jax.Array,  # [N, Lp]
    attention_mask: jax.Array,  # [N, Lp]
    labels: jax.Array,  # [N, Lq]
    chunk: int = 0,
) -> jax.Array:
    """log p(label_t | label_<t, passage) for every pair and position → [N, Lq] fp32.

    With `model.act` (a sharded run) the N pairs are split over the batch axes and each chunk
    holds `chunk` pairs of every device (parallel.activations.map_rows); without it, chunks
    of `chunk` pairs follow each other.
    """
    n = input_ids.shape[0]
    cfg = model.config

    def one_chunk(args: tuple[jax.Array, ...]) -> jax.Array:
        ids, mask, lab = args
        dec_in = shift_right(lab, cfg.decoder_start_token_id, cfg.pad_token_id)

        def fwd(m: T5) -> jax.Array:
            hidden = m.decode(dec_in, m.encode(ids, mask), mask)
            logits = m.logits(hidden)  # [chunk, Lq, V] fp32, this chunk only
            gold = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
            return gold - jax.nn.logsumexp(logits, axis=-1)

        return nn_apply(model, params, fwd)

    act = model.act
    devices = math.prod(act.mesh.shape[a] for a in act.batch) if act is not None else 1
    per_device = max(1, -(-n // devices)) if chunk <= 0 else chunk
    if act is not None and act.batch:
        args = tuple(pad_rows(x, devices * per_device) for x in (input_ids, attention_mask, labels))
        return map_rows(one_chunk, args, act.mesh, act.batch, per_device)[:n]
    chunk = n if chunk <= 0 else min(chunk, n)
    args = tuple(pad_rows(x, chunk) for x in (input_ids, attention_mask, labels))
    if args[0].shape[0] == chunk:
        return one_chunk(args)[:n]
    split = lambda x: x.reshape((-1, chunk) + x.shape[1:])
    out = jax.lax.map(one_chunk, tuple(split(x) for x in args))
    return out.reshape((-1,) + out.shape[2:])[:n]


def nn_apply(model: T5, params: Any, fn: Any) -> Any:
    return model.apply({"params": params}, method=lambda m: fn(m))


def pair_scores(
    model: T5,
    params: Any,
    passage_ids: jax.Array,  # [B, K, Lp]
    passage_mask: jax.Array,  # [B, K, Lp]
    labels: jax.Array,  # [B, Lq]
    label_mask: jax.Array,  # [B, Lq]
    reduction: str = "mean",
    chunk: int = 0,
) -> jax.Array:
    """[B, K] mean (or sum) question log-likelihood given each passage. Jittable."""
    logprobs = functools.partial(token_logprobs, model, params, chunk=chunk)
    return reduce_pairs(logprobs, passage_ids, passage_mask, labels, label_mask, reduction)


def reduce_pairs(
    logprobs: Any,  # (ids [N, Lp], mask [N, Lp], labels [N, Lq]) -> [N, Lq] fp32
    passage_ids: jax.Array,  # [B, K, Lp]
    passage_mask: jax.Array,  # [B, K, Lp]
    labels: jax.Array,  # [B, Lq]
    label_mask: jax.Array,  # [B, Lq]
    reduction: str = "mean",
) -> jax.Array:
    """[B, K] scores: every question against each of its K passages, reduced over tokens."""
    b, k, lp = passage_ids.shape
    rep = lambda x: jnp.repeat(x, k, axis=0)  # [B*K, Lq]: question b for each of its K passages
    logp = logprobs(passage_ids.reshape(b * k, lp), passage_mask.reshape(b * k, lp), rep(labels))
    m = rep(label_mask).astype(jnp.float32)
    total = (logp * m).sum(-1)
    if reduction == "sum":
        out = total
    elif reduction == "mean":
        out = total / jnp.maximum(m.sum(-1), 1.0)
    else:
        raise ValueError(f"reduction {reduction!r}; expected 'mean' or 'sum'")
    return out.reshape(b, k)


@dataclasses.dataclass
class T5Teacher:
    config: T5Config
    params: Any
    tokenizer: Any
    spec: TeacherSpec = TeacherSpec()
    dtype: str = "bfloat16"
    act: Activations | None = None  # activation sharding when run inside a sharded step
    remat: bool = False
    # How `params` are sharded over `act.mesh`. Under fsdp / fsdp_tensor the teacher runs
    # layer by layer (teachers.layerwise) and `params` hold each stack's layers stacked.
    param_sharding: str = "replicated"
    # What `score` has cut so far, reported once per kind (passages / questions).
    truncation: dict[str, Truncation] = dataclasses.field(default_factory=dict, repr=False)
    _reported: set[str] = dataclasses.field(default_factory=set, repr=False)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype: str = "bfloat16",
        spec: TeacherSpec | None = None,
        mesh: Any = None,
        param_sharding: str = "replicated",
    ) -> T5Teacher:
        """With a `mesh`, the parameters come back as global arrays sharded by
        `param_sharding`, each process reading only its blocks of the checkpoint, and the
        teacher constrains its activations for that mesh; without, numpy on the host."""
        from transformers import AutoTokenizer

        dtypes.by_name(dtype)
        act = None
        if mesh is None:
            cfg, params, folder = load_t5(path_or_hub_id, dtype=dtype)
            param_sharding = "replicated"
        else:
            cfg, params, folder = load_t5_sharded(path_or_hub_id, dtype, mesh, param_sharding)
            act = Activations.for_strategy(mesh, param_sharding)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        spec = spec or TeacherSpec()
        teacher = cls(cfg, params, tokenizer, spec, dtype, act=act, param_sharding=param_sharding)
        if teacher.layerwise:  # the pass that reads stacked layers, and only it
            stacked = layerwise.place_stacked(params, cfg, mesh, param_sharding)
            teacher = dataclasses.replace(teacher, params=stacked)
        return teacher

    @property
    def layerwise(self) -> bool:
        """Runs one gathered layer at a time over all pairs (FSDP on a mesh)."""
        return (
            self.act is not None
            and bool(self.act.batch)
            and layerwise.uses_layerwise(self.param_sharding)
        )

    @property
    def model(self) -> T5:
        return T5(self.config, dtype=dtypes.by_name(self.dtype), remat=self.remat, act=self.act)

    def on_mesh(self, mesh: Any, param_sharding: str) -> T5Teacher:
        """This host-loaded teacher with its params placed on `mesh` by `param_sharding`
        (stacked by layer under FSDP) and its activations constrained for that mesh."""
        from jaxret.parallel.partitioning import param_shardings

        params = jax.device_put(self.params, param_shardings(self.params, mesh, param_sharding))
        act = Activations.for_strategy(mesh, param_sharding)
        out = dataclasses.replace(self, params=params, act=act, param_sharding=param_sharding)
        if out.layerwise:
            stacked = layerwise.place_stacked(params, self.config, mesh, param_sharding)
            out = dataclasses.replace(out, params=stacked)
        return out

    def score_tokens(
        self,
        params: Any,
        passage_ids: jax.Array,
        passage_mask: jax.Array,
        labels: jax.Array,
        label_mask: jax.Array,
    ) -> jax.Array:
        """[B, K] scores from token arrays; call inside a jitted step (no gradient flows)."""
        params = jax.lax.stop_gradient(params)
        if self.layerwise:
            logprobs = functools.partial(
                layerwise.token_logprobs,
                self.config,
                dtypes.by_name(self.dtype),
                self.act,
                self.param_sharding,
                params,
                chunk=self.spec.chunk_pairs,
            )
        else:
            logprobs = functools.partial(
                token_logprobs, self.model, params, chunk=self.spec.chunk_pairs
            )
        return reduce_pairs(
            logprobs, passage_ids, passage_mask, labels, label_mask, self.spec.reduction
        )

    def score(self, questions: list[str], passages: list[list[dict]]) -> np.ndarray:
        """Host API: questions [B] and, per question, K passages {"title", "text"} → [B, K]."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
        ks = {len(p) for p in passages}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(
                f"every question needs the same number (> 0) of passages, got {sorted(ks)}"
            )
        k = ks.pop()
        flat = [p for ps in passages for p in ps]
        for p in flat:
            if not isinstance(p, dict) or "text" not in p:
                raise ValueError('each passage must be a dict with "text" (and optionally "title")')
        p_trunc = Truncation("teacher passages", self.spec.max_passage_length)
        q_trunc = Truncation("teacher questions", self.spec.max_question_length)
        tok = tokenize_passages(
            self.tokenizer,
            [p.get("title", "") for p in flat],
            [p["text"] for p in flat],
            self.spec,
            p_trunc,
        )
        q = tokenize_questions(self.tokenizer, list(questions), self.spec, q_trunc)
        self._note(p_trunc, q_trunc)
        b = len(questions)
        shape = (b, k, self.spec.max_passage_length)
        out = _jit_score(self)(
            self.params,
            tok["input_ids"].reshape(shape),
            tok["attention_mask"].reshape(shape),
            q["labels"],
            q["label_mask"],
        )
        return np.asarray(out, np.float32)

    def _note(self, *counts: Truncation) -> None:
        for c in counts:
            total = self.truncation.setdefault(c.what, Truncation(c.what, c.max_length))
            total.merge(c)
            if c.cut and c.what not in self._reported:
                self._reported.add(c.what)
                log.warning("%s (reported once)", c.message())


def _jit_score(teacher: T5Teacher) -> Any:
    return _cached_jit(
        teacher.config, teacher.dtype, teacher.spec, teacher.act, teacher.param_sharding
    )


@functools.lru_cache(maxsize=8)
def _cached_jit(
    config: T5Config, dtype: str, spec: TeacherSpec, act: Activations | None, sharding: str
) -> Any:
    teacher = T5Teacher(config, None, None, spec, dtype, act=act, param_sharding=sharding)
    return jax.jit(teacher.score_tokens)


def abstract_teacher(
    config: T5Config,
    mesh: Any,
    param_sharding: str,
    spec: TeacherSpec,
    dtype: str = "bfloat16",
    layerwise_pass: bool | None = None,
) -> tuple[T5Teacher, Any]:
    """(teacher, its params as sharded ShapeDtypeStructs in `dtype`) on `mesh`, nothing
    loaded: for compiling at real widths (capacity planning, `benchmarks/memory.py`).
    `layerwise_pass=False` keeps FSDP params unstacked and runs the whole-model pass (the
    comparison the memory benchmark prints); default: layer by layer exactly under FSDP."""
    from jaxret.models.hf_t5 import abstract_params
    from jaxret.parallel.partitioning import param_shardings

    if layerwise_pass is None:
        layerwise_pass = layerwise.uses_layerwise(param_sharding)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtypes.by_name(dtype)), abstract_params(config)
    )
    if layerwise_pass:
        params = layerwise.stack_layers(params, config)
        shardings = layerwise.stacked_shardings(params, mesh, param_sharding)
    else:
        shardings = param_shardings(params, mesh, param_sharding)
    act = Activations.for_strategy(mesh, param_sharding)
    # The unstacked pass is the module's: labelled "replicated" so that `layerwise` is off.
    label = param_sharding if layerwise_pass else "replicated"
    teacher = T5Teacher(config, None, None, spec, dtype, act, param_sharding=label)
    if teacher.layerwise != layerwise_pass:
        raise ValueError(f"param sharding {param_sharding!r} has no layer-by-layer pass")
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    return teacher, params


def compile_scoring(
    config: T5Config,
    mesh: Any,
    param_sharding: str,
    pairs: int,
    spec: TeacherSpec,
    dtype: str = "bfloat16",
    layerwise_pass: bool | None = None,
) -> Any:
    """Compiles (never runs) the scores of `pairs` passage–question pairs on `mesh` from
    abstract inputs (`abstract_teacher`): what one device holds and does."""
    from jax.sharding import NamedSharding, PartitionSpec

    teacher, params = abstract_teacher(config, mesh, param_sharding, spec, dtype, layerwise_pass)
    batch_axes = teacher.act.batch
    batch = NamedSharding(mesh, PartitionSpec(batch_axes if batch_axes else None))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch)
    lp, lq = spec.max_passage_length, spec.max_question_length
    args = (i32(pairs, 1, lp), i32(pairs, 1, lp), i32(pairs, lq), i32(pairs, lq))
    return jax.jit(teacher.score_tokens).lower(params, *args).compile()
