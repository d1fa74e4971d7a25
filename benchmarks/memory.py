"""Per-device memory of the paper's ART step, from the compiled program, and its extrapolation
to the full Wikipedia index.

    python benchmarks/memory.py [--variant nq_t0_3b] [--rows-per-device 65536] [--devices 8]

Compiles (never runs: every input is an abstract ShapeDtypeStruct) the real train step of
`configs/art.py:<variant>` — BERT-base towers, the T0-3B (or T5-XXL) teacher with its real
shapes, the row-sharded index and token tables — on 8 fake CPU devices, with the paper's
per-device batch (64 questions over 16 devices = 4 per device) and a reduced corpus of
`rows-per-device` rows per device. `compiled.memory_analysis()` gives what XLA allocates on one
device: arguments (parameters, optimizer state, index, tables), outputs, and temporaries
(activations, teacher attention, logits chunk, MIPS buffers). The corpus-dependent part is then
extrapolated by formula to 21,015,324 passages on 16 devices; the rest is per device already.

Time, computed: the per-device matmul FLOPs of the step (its index search swapped for the
paper's 64 questions over 1.34M rows per device) and of one rolling-refresh slice at the
paper's rows per device, both from compiled programs with loops × their trip counts
(`jaxret.parallel.compiled`), at an assumed `MFU` of the A100's and the TPU v4's bf16 peak.
"""

import argparse
import math
import os

# 8 fake devices (the tests' mesh), whatever the core count: nothing runs, it only compiles.
# XLA:CPU's default concurrency-optimized scheduler runs every recomputation early and so
# ignores rematerialization; the memory-minimizing schedule is closer to what the GPU and TPU
# compilers do with a memory limit.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxret.configlib import load_config  # noqa: E402
from jaxret.index.mips import RowLayout, row_sharding  # noqa: E402
from jaxret.index.rolling import rolling_refresher, slice_plan  # noqa: E402
from jaxret.index.sharded import ShardedIndex  # noqa: E402
from jaxret.methods.art import step as art  # noqa: E402
from jaxret.models import dual_encoder as de  # noqa: E402
from jaxret.models.bert import BertConfig  # noqa: E402
from jaxret.models.hf_bert import abstract_params as bert_params  # noqa: E402
from jaxret.models.t5 import T5Config  # noqa: E402
from jaxret.parallel import make_mesh  # noqa: E402
from jaxret.parallel.activations import Activations  # noqa: E402
from jaxret.parallel.compiled import program  # noqa: E402
from jaxret.teachers.t5_teacher import (  # noqa: E402
    TeacherSpec,
    abstract_teacher,
    compile_scoring,
)
from jaxret.train import state as train_state  # noqa: E402
from jaxret.train.optim import make_optimizer  # noqa: E402

WIKI_ROWS = 21_015_324
TEACHERS = {  # config.json fields of the paper's teachers
    "bigscience/T0_3B": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "google/t5-xxl-lm-adapt": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}
GB = 1e9
# Dense bf16 peak per device, from the vendors' datasheets (A100: 312 TFLOP/s without
# sparsity; TPU v4: 275 TFLOP/s per chip), and the share of it assumed reached.
PEAK_BF16 = {"A100-40GB": 312e12, "TPU v4 chip": 275e12}
MFU = 0.40
# DPR's qas/nq-train.csv, the file ART's script trains on
# (examples/zero-shot-retriever-training/art-nq-T0-3B.sh:7).
NQ_TRAIN_QUESTIONS = 79_168


def teacher_config(name, layers=None):
    t = dict(TEACHERS[name])
    if layers is not None:
        t["num_layers"] = layers
    return T5Config(
        vocab_size=32128,
        d_kv=64,
        num_decoder_layers=t["num_layers"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        scale_decoder_outputs=False,
        **t,
    )


def teacher_table(name, mesh, spec, pairs):
    """The teacher's scoring pass alone at real widths, 2/4/8 layers per stack: per-device
    arguments and temporaries for each layout, fp32 and bf16 weights."""
    print(
        f"\n{name} widths, scoring {pairs // mesh.size} pairs per device "
        f"({spec.max_passage_length} + {spec.max_question_length} tokens, chunks of "
        f"{spec.chunk_pairs}) on {mesh.size} devices; GB per device (memory_analysis):"
    )
    print("| layout | weights | layers | arguments | temporaries |")
    print("|---|---|---|---|---|")
    layouts = [
        ("fsdp, layer by layer", "fsdp", None, (8, 1)),
        ("fsdp, whole model (before)", "fsdp", False, (8, 1)),
        ("tensor (4 × 2 mesh)", "tensor", None, (4, 2)),
    ]
    for label, strategy, layerwise_pass, shape in layouts:
        m = make_mesh(("data", "model"), shape)
        for dtype in ("float32", "bfloat16"):
            for layers in (2, 4, 8):
                cfg = teacher_config(name, layers)
                c = compile_scoring(cfg, m, strategy, pairs, spec, dtype, layerwise_pass)
                mem = c.memory_analysis()
                print(
                    f"| {label} | {dtype} | {layers} | {mem.argument_size_in_bytes / GB:.3f} "
                    f"| {mem.temp_size_in_bytes / GB:.3f} |",
                    flush=True,
                )


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def index_dtype(cfg):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[cfg.encode.index_dtype]


def student(cfg, mesh):
    """The BERT-base towers (bert-base-uncased / MSS): encoder, spec, abstract parameters."""
    bert = BertConfig(add_pooler=False)
    spec = de.EncoderSpec.from_config(cfg.model)
    encoder = de.DualEncoder(bert, spec, Activations.for_strategy(mesh, cfg.mesh.param_sharding))
    towers = ("shared",) if spec.shared else ("query", "passage")
    return encoder, spec, {t: bert_params(bert) for t in towers}


def compile_step(cfg, mesh, rows_per_device, batch):
    encoder, spec, params = student(cfg, mesh)
    bert = encoder.bert
    t5 = teacher_config(cfg.teacher.model)
    tspec = TeacherSpec(
        max_passage_length=cfg.teacher.max_passage_length,
        max_question_length=cfg.teacher.max_question_length,
        chunk_pairs=cfg.teacher.chunk_pairs,
    )
    teacher, t_params = abstract_teacher(
        t5, mesh, cfg.teacher.param_sharding, tspec, cfg.teacher.dtype
    )

    optimizer = make_optimizer(cfg.optimizer, 1000)
    state = jax.eval_shape(lambda p: train_state.init_state(p, optimizer, 0), params)
    shardings = train_state.state_shardings(state, mesh, cfg.mesh.param_sharding)
    state = abstract(state, shardings)

    n = rows_per_device * mesh.size
    layout = RowLayout.for_mesh(n, mesh, cfg.encode.chunk_rows)
    rows = row_sharding(mesh)
    embeddings = jax.ShapeDtypeStruct(
        (layout.padded_rows, bert.hidden_size), index_dtype(cfg), sharding=rows
    )
    index = ShardedIndex(embeddings, layout, mesh)
    lp, lt = spec.max_passage_length, tspec.max_passage_length
    tables = {
        "input_ids": jax.ShapeDtypeStruct((layout.padded_rows, lp), jnp.uint16, sharding=rows)
    }
    t_tables = {
        "input_ids": jax.ShapeDtypeStruct((layout.padded_rows, lt), jnp.uint16, sharding=rows)
    }
    data = NamedSharding(mesh, P("data"))
    lq, lqt = spec.max_query_length, tspec.max_question_length
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data)
    batch = {
        "query": {k: i32(batch, lq) for k in ("input_ids", "attention_mask", "token_type_ids")},
        "target": {"labels": i32(batch, lqt), "label_mask": i32(batch, lqt)},
    }
    art_cfg = art.ArtConfig(top_k=cfg.art.top_k, teacher="t5")
    in_shardings = (
        shardings,
        jax.tree.map(lambda _: data, batch),
        jax.tree.map(lambda _: rows, index),
        jax.tree.map(lambda _: rows, tables),
        jax.tree.map(lambda _: rows, t_tables),
        jax.tree.map(lambda x: x.sharding, t_params),
    )
    step = art.make_train_step(encoder, optimizer, art_cfg, mesh, in_shardings, teacher)
    lowered = step.lower(state, batch, index, tables, t_tables, t_params)
    return lowered.compile(), layout, bert, t5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="nq_t0_3b")
    p.add_argument("--rows-per-device", type=int, default=65536)
    p.add_argument("--paper-devices", type=int, default=16)
    p.add_argument("--teacher-only", action="store_true", help="only the teacher table")
    args = p.parse_args()
    cfg = load_config(f"configs/art.py:{args.variant}")
    mesh = make_mesh(("data", "model"), (-1, 1))
    d = mesh.size
    per_device_batch = cfg.train.batch_size // args.paper_devices
    batch = per_device_batch * d
    print(
        f"{args.variant}: compiling the train step on {d} devices, {batch} questions "
        f"({per_device_batch} per device), K={cfg.art.top_k}, "
        f"{args.rows_per_device} rows per device"
    )
    tspec = TeacherSpec(
        max_passage_length=cfg.teacher.max_passage_length,
        max_question_length=cfg.teacher.max_question_length,
        chunk_pairs=cfg.teacher.chunk_pairs,
    )
    if not args.teacher_only:
        compiled = step_table(cfg, mesh, args, batch)
        time_table(cfg, mesh, args, batch, compiled)
    teacher_table(cfg.teacher.model, mesh, tspec, batch * cfg.art.top_k)
    print(
        "bf16 on XLA:CPU: the CPU compiler multiplies bf16 in fp32 and converts the whole "
        "stacked bf16 weights to an fp32 copy before the layer loop (a scan over 8 stacked "
        "[512, 512] bf16 weights shows the same 8 MiB convert), so its bf16 temporaries grow "
        "with the layers; the fp32 rows are what a compiler with native bf16 dots allocates."
    )


def step_table(cfg, mesh, args, batch):
    compiled, layout, bert, t5 = compile_step(cfg, mesh, args.rows_per_device, batch)
    mem = compiled.memory_analysis()
    args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp_b, alias_b = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    rows = layout.rows_per_shard
    lp, lt = cfg.model.max_passage_length, cfg.teacher.max_passage_length
    idx_bytes = 2 if cfg.encode.index_dtype == "bfloat16" else 4
    corpus_per_row = bert.hidden_size * idx_bytes + lp * 2 + lt * 2  # index + uint16 tables
    corpus_measured = rows * corpus_per_row
    fixed_args = args_b - corpus_measured
    print("\nmeasured per device (compiled.memory_analysis):")
    print(
        f"  arguments {args_b / GB:8.3f} GB  (corpus part {corpus_measured / GB:.3f} GB: "
        f"{rows} rows × {corpus_per_row} B)"
    )
    print(f"  outputs   {out_b / GB:8.3f} GB  (aliased with donated inputs: {alias_b / GB:.3f} GB)")
    print(
        f"  temporary {temp_b / GB:8.3f} GB  (activations, teacher attention + logits chunk, "
        "MIPS buffers)"
    )
    wiki_rows = math.ceil(WIKI_ROWS / args.paper_devices)
    corpus_wiki = wiki_rows * corpus_per_row
    # The MIPS temporaries grow with the chunk, not the corpus: the rest of `temp` is per step.
    total = fixed_args + corpus_wiki + (out_b - alias_b) + temp_b
    print(
        f"\nextrapolated to {WIKI_ROWS:,} passages on {args.paper_devices} devices "
        f"({wiki_rows:,} rows per device):"
    )
    print(
        f"  index {wiki_rows * bert.hidden_size * idx_bytes / GB:.2f} GB + retriever tokens "
        f"{wiki_rows * lp * 2 / GB:.2f} GB + teacher tokens {wiki_rows * lt * 2 / GB:.2f} GB"
    )
    print(f"  parameters, optimizer, teacher shard (measured) {fixed_args / GB:.2f} GB")
    print(f"  activations and other temporaries (measured)   {temp_b / GB:.2f} GB")
    print(f"  total per device ≈ {total / GB:.2f} GB")
    return compiled


def refresh_flops(cfg, mesh, rows_per_device: int) -> tuple[float, int, int]:
    """(per-device matmul FLOPs, rows, encoder calls) of one rolling-refresh step at
    `rows_per_device`, from the compiled refresh program (loops × their trip counts)."""
    encoder, spec, params = student(cfg, mesh)
    layout = RowLayout(
        rows_per_device * mesh.size, mesh.size, rows_per_device, cfg.encode.chunk_rows
    )
    rows = row_sharding(mesh)
    refresh_every = cfg.train.refresh_every
    s, chunk = slice_plan(layout, refresh_every, cfg.encode.device_batch)
    fn = rolling_refresher(encoder, mesh, layout, refresh_every, cfg.encode.device_batch)
    table = jax.ShapeDtypeStruct(
        (layout.padded_rows, spec.max_passage_length), jnp.uint16, sharding=rows
    )
    emb = jax.ShapeDtypeStruct((layout.padded_rows, encoder.dim), index_dtype(cfg), sharding=rows)
    stale = jax.ShapeDtypeStruct((layout.padded_rows,), jnp.int32, sharding=rows)
    compiled = fn.lower(params, {"input_ids": table}, emb, stale, 1).compile()
    return program(compiled).dot_flops(), s, s // chunk


def mips_flops(cfg, mesh, rows_per_device: int, queries: int, dim: int) -> float:
    """Per-device matmul FLOPs of the exact search of `queries` queries of width `dim` (the
    step's index search) over `rows_per_device` rows per device, from its compiled program."""
    layout = RowLayout(
        rows_per_device * mesh.size, mesh.size, rows_per_device, cfg.encode.chunk_rows
    )
    dtype = index_dtype(cfg)
    emb = jax.ShapeDtypeStruct((layout.padded_rows, dim), dtype, sharding=row_sharding(mesh))
    index = ShardedIndex(emb, layout, mesh)
    q = jax.ShapeDtypeStruct((queries, dim), jnp.float32, sharding=NamedSharding(mesh, P()))
    search = jax.jit(lambda index, q: index.search(q, cfg.art.top_k))
    return program(search.lower(index, q).compile()).dot_flops()


def time_table(cfg, mesh, args, batch, compiled):
    """Per-device matmul FLOPs of one step at the paper's size, from the compiled programs,
    and the time they take at `MFU` of each device's bf16 peak: computed, not measured."""
    layout = RowLayout.for_shards(WIKI_ROWS, args.paper_devices, cfg.encode.chunk_rows)
    paper_batch = cfg.train.batch_size
    # The step compiled here searches its `batch` questions over `rows_per_device` rows; the
    # paper's searches all 64 over 1.34M rows per device: swap the one search for the other.
    dim = student(cfg, mesh)[0].dim  # [rows, dim] index, [queries, dim] queries
    mips_here = mips_flops(cfg, mesh, args.rows_per_device, batch, dim)
    mips_paper = mips_flops(cfg, mesh, layout.rows_per_shard, paper_batch, dim)
    step = program(compiled).dot_flops() - mips_here + mips_paper
    refresh, s, calls = refresh_flops(cfg, mesh, layout.rows_per_shard)
    steps = cfg.train.epochs * math.ceil(NQ_TRAIN_QUESTIONS / paper_batch)
    print(
        f"\nper-device matmul FLOPs per step at {WIKI_ROWS:,} passages on "
        f"{args.paper_devices} devices ({layout.rows_per_shard:,} rows each; compiled, loops "
        "× trip counts):"
    )
    print(
        f"  train step {step / 1e12:.1f} TFLOP (of which the MIPS scan "
        f"{mips_paper / 1e12:.2f}); rolling refresh {refresh / 1e12:.1f} TFLOP ({s:,} rows "
        f"in {calls} encoder calls per device)"
    )
    print(
        f"computed at {MFU:.0%} of the bf16 peak; {steps:,} steps ({cfg.train.epochs} epochs "
        f"of {NQ_TRAIN_QUESTIONS:,} questions, batch {paper_batch}):"
    )
    print("| device | train step | + rolling refresh | sync refresh (whole corpus) | run |")
    print("|---|---|---|---|---|")
    for device, peak in PEAK_BF16.items():
        rate = peak * MFU
        sync = refresh * cfg.train.refresh_every / rate  # the same rows, all at once
        run = steps * (step + refresh) / rate
        print(
            f"| {device} | {step / rate:.2f} s | {(step + refresh) / rate:.2f} s | "
            f"{sync / 60:.1f} min | {run / 3600:.1f} h |"
        )


if __name__ == "__main__":
    main()
