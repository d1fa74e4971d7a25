"""Exact top-k MIPS: jaxret ShardedIndex vs torch, numpy and faiss IndexFlatIP, same machine.

    python benchmarks/mips.py [--rows 100000,1000000] [--dim 128] [--k 10,100]
        [--queries 1,16,64,1024] [--dtypes float32,bfloat16]

Prints one markdown table: each peer's time (torch matmul + topk, numpy argpartition, faiss
IndexFlatIP), jaxret's (`ShardedIndex.search`), the ratio fastest peer / jaxret (> 1:
jaxret faster), jaxret with each per-device selection forced (`mips_top_k(selection=
"running" | "two_pass")`; the default "auto" picks one by shape), and jaxret's achieved
GFLOP/s against a numpy sgemm peak measured in the same run. Peers score
queries in batches of 256 (a 1024 × 1M fp32 score matrix would be 4 GB).
"""

import argparse
import time

from common import best_time, cpu_devices_per_core

cores = cpu_devices_per_core()

import faiss  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxret.index.mips import mips_top_k  # noqa: E402
from jaxret.index.sharded import ShardedIndex  # noqa: E402

PEER_BATCH = 256


def numpy_search(emb, q, k):
    out = []
    for s in range(0, len(q), PEER_BATCH):
        scores = q[s : s + PEER_BATCH] @ emb.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        top = np.take_along_axis(scores, part, 1)
        order = np.argsort(-top, axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def torch_search(emb, q, k):
    out = []
    with torch.inference_mode():
        for s in range(0, len(q), PEER_BATCH):
            out.append(torch.topk(q[s : s + PEER_BATCH] @ emb.T, k, dim=1).indices)
    return torch.cat(out)


def matmul_peak():
    a = np.random.rand(4096, 4096).astype(np.float32)
    t = best_time(lambda: a @ a, repeats=3)
    return 2 * 4096**3 / t / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="100000,1000000", help="comma-separated corpus sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", default="10,100", help="comma-separated k")
    p.add_argument("--queries", default="1,16,64,1024", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)
    rng = np.random.default_rng(0)
    peak = matmul_peak()
    print(
        f"{jax.device_count()} jax CPU devices, {cores} cores; numpy sgemm peak {peak:.1f} GFLOP/s"
        f" ({time.strftime('%Y-%m-%d')})"
    )
    print(
        "| dtype | N | k | B | torch s | numpy s | faiss s | jaxret s | jaxret / fastest peer "
        "| running s | two-pass s | jaxret GFLOP/s | % sgemm peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.rows.split(",")):
        emb = rng.standard_normal((n, args.dim), dtype=np.float32)
        for dtype in args.dtypes.split(","):
            index = ShardedIndex.from_embeddings(emb, dtype=jnp.dtype(dtype))
            bf16 = dtype == "bfloat16"
            host_emb = emb.astype(ml_dtypes.bfloat16).astype(np.float32) if bf16 else emb
            t_emb = torch.from_numpy(emb).bfloat16() if bf16 else torch.from_numpy(emb)
            flat = faiss.IndexFlatIP(args.dim)
            flat.add(host_emb)
            for k in (int(x) for x in args.k.split(",")):
                forced = {
                    sel: jax.jit(
                        lambda e, q, k=k, sel=sel: mips_top_k(
                            e, q, k, index.layout, index.mesh, sel
                        )
                    )
                    for sel in ("running", "two_pass")
                }
                for nq in (int(x) for x in args.queries.split(",")):
                    q = rng.standard_normal((nq, args.dim), dtype=np.float32)
                    qj = jnp.asarray(q)
                    ours = best_time(lambda: jax.block_until_ready(index.search(qj, k)))
                    each = [
                        best_time(lambda f=f: jax.block_until_ready(f(index.embeddings, qj)))
                        for f in forced.values()
                    ]
                    tq = torch.from_numpy(q).bfloat16() if bf16 else torch.from_numpy(q)
                    peers = {
                        "torch": best_time(lambda: torch_search(t_emb, tq, k)),
                        "numpy": float("nan")
                        if bf16  # numpy has no bf16 matmul
                        else best_time(lambda: numpy_search(host_emb, q, k), repeats=1),
                        "faiss": best_time(lambda: flat.search(q, k)),
                    }
                    fastest = min(t for t in peers.values() if t == t)
                    gflops = 2 * nq * n * args.dim / ours / 1e9
                    print(
                        f"| {dtype} | {n:,} | {k} | {nq} | "
                        + " | ".join(f"{t:.4f}" for t in peers.values())
                        + f" | {ours:.4f} | {fastest / ours:.2f} | {each[0]:.4f} | {each[1]:.4f} "
                        f"| {gflops:.1f} | "
                        f"{100 * gflops / peak:.0f} % |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
