"""Where the time of one ART step goes: question encoding, search, gather, passage encoding,
teacher, backward, update — each part jitted alone on the step's own shapes.

    python benchmarks/art_step.py [--variant demo|tiny] [--model PATH]

Prints each part's time and share, and the share of search + gather (target < 5 %).
"""

import argparse
import sys
from pathlib import Path

from common import best_time, cpu_devices_per_core

cpu_devices_per_core()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxret.configlib import load_config  # noqa: E402
from jaxret.data.tokenization import load_tokenizer, tokenize_passages, tokenize_queries  # noqa: E402
from jaxret.index.gather import device_table, gather_rows  # noqa: E402
from jaxret.index.sharded import ShardedIndex  # noqa: E402
from jaxret.methods.art import step as art  # noqa: E402
from jaxret.methods.art.data import load_art_data, sparse_teacher_table  # noqa: E402
from jaxret.models import dual_encoder as de  # noqa: E402
from jaxret.parallel import global_batch, make_mesh  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="demo")
    p.add_argument("--model", help="checkpoint (the tiny variant needs one)")
    args = p.parse_args()
    overrides = [("model.name", args.model)] if args.model else []
    if args.variant == "tiny" and not args.model:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import save_tiny_bert

        overrides = [("model.name", str(save_tiny_bert(Path("/tmp/jaxret_bench_tiny_bert"))))]
    cfg = load_config(f"configs/art.py:{args.variant}", overrides)
    mesh = make_mesh()
    data = load_art_data(cfg.data)
    spec = de.EncoderSpec.from_config(cfg.model)
    encoder, params, tok_folder = de.from_pretrained(cfg.model.name, spec)
    tok = load_tokenizer(tok_folder)
    c = data.corpus
    p_tok = tokenize_passages(tok, c.titles, c.texts, spec.max_passage_length, spec.passage_format)
    embed_p = jax.jit(lambda prm, t: encoder.embed(prm, "passage", t))
    emb = np.concatenate(
        [
            np.asarray(embed_p(params, {k: v[s : s + 256] for k, v in p_tok.items()}))
            for s in range(0, len(c), 256)
        ]
    )
    index = ShardedIndex.from_embeddings(emb, mesh, cfg.encode.index_dtype, cfg.encode.chunk_rows)
    layout = index.layout
    pad = lambda v: np.pad(v, ((0, layout.padded_rows - len(v)), (0, 0)))
    tables = {
        "input_ids": device_table(
            lambda s, e: pad(p_tok["input_ids"])[s:e], layout, mesh, np.uint16
        )
    }
    b, k = cfg.train.batch_size, min(cfg.art.top_k, len(c))
    q_tok = tokenize_queries(tok, data.train_questions[:b], spec.max_query_length)
    t_ids, t_scores = sparse_teacher_table(data, cfg.teacher.kind, cfg.teacher)
    batch = global_batch(
        {"query": q_tok, "teacher_ids": t_ids[:b], "teacher_scores": t_scores[:b]}, mesh
    )
    acfg = art.ArtConfig(
        top_k=k,
        temperature_multiplier=cfg.art.temperature_multiplier,
        teacher=cfg.teacher.kind,
        dropout=cfg.art.dropout,
    )
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    opt = optax.adamw(1e-5)
    opt_state = opt.init(params)

    q = jax.jit(lambda prm: encoder.embed(prm, "query", batch["query"]))(params)
    _, ids = index.search(q, k)
    flat = ids.reshape(-1)
    rows = {"input_ids": gather_rows(tables["input_ids"], flat, layout, mesh)}
    rows["attention_mask"] = (rows["input_ids"] != 0).astype(jnp.int32)
    rows["token_type_ids"] = jnp.zeros_like(rows["input_ids"])
    loss = lambda prm: art.art_loss(
        prm,
        batch,
        index,
        tables,
        {},
        None,
        jax.random.key(0),
        encoder=encoder,
        cfg=acfg,
        mesh=mesh,
        teacher=None,
    )[0]
    grads = jax.jit(jax.grad(loss))(params)
    parts = {
        "question encoding": (
            jax.jit(lambda prm: encoder.embed(prm, "query", batch["query"])),
            (params,),
        ),
        "search": (jax.jit(lambda ix, qq: ix.search(qq, k)), (index, q)),
        "gather": (
            jax.jit(lambda t, i: gather_rows(t, i, layout, mesh)),
            (tables["input_ids"], flat),
        ),
        "passage encoding": (embed_p, (params, rows)),
        "teacher": (
            jax.jit(
                lambda i: art.sparse_teacher_scores(
                    batch["teacher_ids"], batch["teacher_scores"], i
                )
            ),
            (ids,),
        ),
        "forward (whole loss)": (jax.jit(loss), (params,)),
        "forward + backward": (jax.jit(jax.grad(loss)), (params,)),
        "update": (jax.jit(lambda g, s, prm: opt.update(g, s, prm)), (grads, opt_state, params)),
    }
    times = {
        name: best_time(lambda f=f, a=a: jax.block_until_ready(f(*a)))
        for name, (f, a) in parts.items()
    }
    times["backward"] = times.pop("forward + backward") - times["forward (whole loss)"]
    step = times["forward (whole loss)"] + times["backward"] + times["update"]
    print(
        f"ART step, variant {args.variant}: batch {b}, K {k}, {len(c)} passages, "
        f"{jax.device_count()} devices, teacher {cfg.teacher.kind}"
    )
    for name in (
        "question encoding",
        "search",
        "gather",
        "passage encoding",
        "teacher",
        "forward (whole loss)",
        "backward",
        "update",
    ):
        print(f"  {name:>22}: {1e3 * times[name]:9.2f} ms  {100 * times[name] / step:5.1f} %")
    share = (times["search"] + times["gather"]) / step
    print(f"  {'step (fwd+bwd+update)':>22}: {1e3 * step:9.2f} ms")
    print(f"  search + gather share of the step: {100 * share:.2f} %  (target < 5 %)")


if __name__ == "__main__":
    main()
