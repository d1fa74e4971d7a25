"""Synthetic queries for a corpus (Liang et al.'s query generation; BEIR's GenQ; docT5query).

For every passage the generator reads `prefix + (title + " " + text).strip()`, cut to
`max_input_length` tokens with the tokenizer's own end of sequence, and decodes queries
(nucleus samples, beams or greedy; `Decoding`). With sampling, `num_return` samples are
drawn, the `keep` most likely kept, then exact duplicates removed (the paper: 10 samples at
p = 0.95, top 5, duplicates removed). A query's text is
`tokenizer.decode(ids, skip_special_tokens=True).strip()`; empty ones are dropped.

The output is a BEIR folder: `queries.jsonl` (`_id` = "<passage id>#q<rank>", the passage
and the query's log-likelihood alongside), `qrels/train.tsv` (each query → its passage),
`corpus.jsonl[.gz]` a link to the source corpus (not a copy) and `generation.json` (what made
it). Work is done in shards of passages written atomically: a killed run resumes where it
stopped and produces the same bytes; each process of a multi-process run generates the shards
`shard % processes == process` on its own devices, and process 0 merges. Sampling keys are a
function of the seed and the passage's row, so no batching, sharding or resumption changes a
query.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxret.data.readers import Corpus, DataError
from jaxret.models.generate import Decoding, generate
from jaxret.models.seq2seq import Generator
from jaxret.parallel.axes import DATA
from jaxret.parallel.mesh import make_mesh

SHARDS = "shards"


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    decoding: Decoding = Decoding("sample", max_new_tokens=64, num_return=10, top_p=0.95)
    keep: int = 5
    max_input_length: int = 512
    prefix: str = ""
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 1024
    # Rank samples by log-likelihood per token (False: the sum, as the paper's "likelihood").
    length_normalized: bool = False

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoding"] = dataclasses.asdict(self.decoding)
        return d


DECODINGS = ("nucleus", "top_k", "beam", "greedy")


def generation_spec(
    s: Mapping[str, Any],
    max_input_length: int,
    prefix: str,
    seed: int,
    name: Callable[[str], str] = lambda key: f"generate.{key}",
) -> GenerationSpec:
    """The decoding and generation settings of `s` (QGen's `generate` config section, or
    `jaxret generate`'s flags): decoding (nucleus | top_k | beam | greedy), num_samples, keep,
    num_beams, top_p, top_k, temperature, max_length, batch_size, shard_size,
    length_normalized. `name` spells a setting in error messages (a config key or a flag)."""
    kind, n, keep = s["decoding"], s["max_length"], s["keep"]
    if kind not in DECODINGS:
        raise ValueError(f"{name('decoding')}={kind!r}; expected {' | '.join(DECODINGS)}")
    if keep < 1:
        raise ValueError(f"{name('keep')} {keep}: keep at least one query per passage")
    if kind == "beam":
        if keep > s["num_beams"]:
            raise ValueError(f"{name('keep')} {keep} of {name('num_beams')} {s['num_beams']} beams")
        decoding = Decoding("beam", n, num_return=keep, num_beams=s["num_beams"])
    elif kind == "greedy":
        decoding = Decoding("greedy", n)
    else:
        if keep > s["num_samples"]:
            raise ValueError(
                f"{name('keep')} {keep} of {name('num_samples')} {s['num_samples']} samples"
            )
        decoding = Decoding(
            "sample",
            n,
            num_return=s["num_samples"],
            top_p=s["top_p"] if kind == "nucleus" else 1.0,
            top_k=s["top_k"],
            temperature=s.get("temperature", 1.0),
        )
    return GenerationSpec(
        decoding,
        keep,
        max_input_length,
        prefix,
        seed,
        s["batch_size"],
        s["shard_size"],
        s.get("length_normalized", False),
    )


def config_spec(cfg: Any) -> GenerationSpec:
    """The generation settings of a QGen config (its `generate` and `generator` sections)."""
    g = cfg.generator
    return generation_spec(cfg.generate, g.max_input_length, g.prefix, cfg.seed)


def passage_text(title: str, text: str, prefix: str = "") -> str:
    return prefix + f"{title} {text}".strip()


def encode_inputs(
    tokenizer: Any, titles: list[str], texts: list[str], spec: GenerationSpec, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """[n, L] ids/mask, L the batch's longest cut to a multiple of 32 (few compiled shapes)."""
    rows = tokenizer(
        [passage_text(t, x, spec.prefix) for t, x in zip(titles, texts)],
        truncation=True,
        max_length=spec.max_input_length,
    )["input_ids"]
    longest = max(len(r) for r in rows)
    width = min(spec.max_input_length, -(-longest // 32) * 32)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def select(
    texts: list[str],
    loglik: np.ndarray,
    keep: int,
    lengths: np.ndarray | None = None,
) -> list[tuple[str, float]]:
    """The paper's selection (Liang et al. §4: "10 independent samples, selecting the top 5
    queries based on the likelihood scores. After removing duplicate queries ..."): the `keep`
    most likely samples (ties: first generated), then duplicates and empty texts dropped, so
    fewer than `keep` may remain. With `lengths` (tokens per sample), ranked by likelihood per
    token instead. Returns (text, log-likelihood) pairs, the raw sum either way."""
    score = loglik if lengths is None else loglik / np.maximum(lengths, 1)
    ranked = sorted(range(len(texts)), key=lambda i: -score[i])[:keep]  # stable on ties
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i in ranked:
        if texts[i] and texts[i] not in seen:
            seen.add(texts[i])
            out.append((texts[i], float(loglik[i])))
    return out


def _shard_path(out: Path, shard: int) -> Path:
    return out / SHARDS / f"shard-{shard:06d}.jsonl"


def _generate_shard(
    generator: Generator,
    params: Any,
    tokenizer: Any,
    corpus: Corpus,
    rows: range,
    spec: GenerationSpec,
    mesh: Any,
) -> list[str]:
    cfg = generator.config
    lines = []
    d = spec.decoding
    data = NamedSharding(mesh, DATA)
    bs = -(-spec.batch_size // mesh.size) * mesh.size
    key = jax.random.key(spec.seed)
    for s in range(rows.start, rows.stop, bs):
        real = list(range(s, min(s + bs, rows.stop)))
        batch = real + [real[-1]] * (bs - len(real))  # padded with copies, dropped after
        ids, mask = encode_inputs(
            tokenizer,
            [corpus.titles[r] for r in batch],
            [corpus.texts[r] for r in batch],
            spec,
            cfg.pad_token_id,
        )
        place = lambda x: jax.device_put(x, data)
        seqs, loglik, _ = generate(
            generator.model,
            params,
            place(ids),
            place(mask),
            key,
            d,
            place(np.asarray(batch, np.int32)),
        )
        seqs, loglik = np.asarray(seqs), np.asarray(loglik)
        for i, r in enumerate(real):
            tokens = [_until_eos(seq, cfg.eos_token_id) for seq in seqs[i]]
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
            lengths = np.array([len(t) for t in tokens]) if spec.length_normalized else None
            for rank, (text, ll) in enumerate(select(texts, loglik[i], spec.keep, lengths)):
                doc = corpus.ids[r]
                row = {
                    "_id": f"{doc}#q{rank}",
                    "text": text,
                    "passage": doc,
                    "loglik": round(ll, 6),
                }
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


def _until_eos(seq: np.ndarray, eos: int) -> list[int]:
    seq = seq.tolist()
    return seq[: seq.index(eos) + 1] if eos in seq else seq


def generate_queries(
    generator: Generator,
    params: Any,
    tokenizer: Any,
    corpus: Corpus,
    corpus_path: str | os.PathLike,
    out: str | os.PathLike,
    spec: GenerationSpec,
    progress: bool = True,
    max_shards: int | None = None,
) -> Path:
    """Writes (or completes) the synthetic BEIR folder `out`; returns it. `max_shards` stops
    after that many new shards (tests of resumption)."""
    out = Path(out)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    meta = {
        "spec": spec.describe(),
        "corpus": str(Path(corpus_path).absolute()),
        "corpus_hash": corpus.content_hash(),
    }
    meta_path = out / "generation.json"
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        if {k: saved.get(k) for k in meta} != meta:
            raise DataError(
                f"{out} holds queries generated for another corpus or setting: use another --out"
            )
    elif jax.process_index() == 0:
        meta_path.write_text(json.dumps(meta, indent=2))
    n_shards = math.ceil(len(corpus) / spec.shard_size)
    procs, me = jax.process_count(), jax.process_index()
    mine = [s for s in range(n_shards) if s % procs == me and not _shard_path(out, s).is_file()]
    if max_shards is not None:
        mine = mine[:max_shards]
    mesh = make_mesh(devices=jax.local_devices())
    for s in tqdm(mine, desc="generating", unit="shard", disable=not progress):
        rows = range(s * spec.shard_size, min((s + 1) * spec.shard_size, len(corpus)))
        lines = _generate_shard(generator, params, tokenizer, corpus, rows, spec, mesh)
        path = _shard_path(out, s)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)
    if procs > 1:
        multihost_utils.sync_global_devices("jaxret-generate")
    if me == 0 and all(_shard_path(out, s).is_file() for s in range(n_shards)):
        _merge(out, n_shards, Path(corpus_path))
    if procs > 1:
        multihost_utils.sync_global_devices("jaxret-generate-merged")
    return out


def _merge(out: Path, n_shards: int, corpus_path: Path) -> None:
    queries, qrels = [], ["query-id\tcorpus-id\tscore\n"]
    for s in range(n_shards):
        for line in _shard_path(out, s).read_text(encoding="utf-8").splitlines(keepends=True):
            queries.append(line)
            row = json.loads(line)
            qrels.append(f"{row['_id']}\t{row['passage']}\t1\n")
    (out / "qrels").mkdir(exist_ok=True)
    for name, lines in (("queries.jsonl", queries), ("qrels/train.tsv", qrels)):
        tmp = out / f".{Path(name).name}.tmp"
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, out / name)
    source = corpus_path if corpus_path.exists() else Path(f"{corpus_path}.gz")
    link = out / source.name
    if not link.exists():
        link.symlink_to(source.absolute())
