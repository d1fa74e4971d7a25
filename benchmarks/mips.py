"""Exact top-k MIPS: jaxret ShardedIndex vs torch, numpy and faiss IndexFlatIP, same machine.

    python benchmarks/mips.py [--rows 1000000] [--dim 128] [--k 100]

Prints each time, jaxret/peer speed ratios (> 1: jaxret faster) and achieved GFLOP/s against
a matmul peak measured in the same run. Peers score queries in batches of 256 (a 1024 × 1M
fp32 score matrix would be 4 GB).
"""

import argparse

from common import best_time, cpu_devices_per_core

cores = cpu_devices_per_core()

import faiss  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    peak = matmul_peak()
    print(
        f"{jax.device_count()} jax CPU devices, {cores} cores; numpy sgemm peak {peak:.1f} GFLOP/s"
    )
    print(f"{args.rows:,} x {args.dim}, k={args.k}")
    header = f"{'dtype':>6} {'queries':>7} {'peer':>8} {'peer s':>8} {'jaxret s':>9} {'ratio':>6}"
    print(header + f" {'jaxret GFLOP/s':>15} {'% peak':>7}")
    for dtype in ("float32", "bfloat16"):
        index = ShardedIndex.from_embeddings(emb, dtype=jnp.dtype(dtype), chunk_rows=65536)
        host_emb = emb if dtype == "float32" else emb.astype(ml_dtypes.bfloat16).astype(np.float32)
        t_emb = torch.from_numpy(emb) if dtype == "float32" else torch.from_numpy(emb).bfloat16()
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(host_emb)
        for nq in (64, 1024):
            q = rng.standard_normal((nq, args.dim), dtype=np.float32)
            qj = jnp.asarray(q)
            ours = best_time(lambda: jax.block_until_ready(index.search(qj, args.k)))
            tq = torch.from_numpy(q) if dtype == "float32" else torch.from_numpy(q).bfloat16()
            peers = {
                "torch": best_time(lambda: torch_search(t_emb, tq, args.k)),
                "faiss": best_time(lambda: flat.search(q, args.k)),
            }
            if dtype == "float32":  # numpy has no bf16 matmul
                peers["numpy"] = best_time(lambda: numpy_search(host_emb, q, args.k), repeats=1)
            gflops = 2 * nq * args.rows * args.dim / ours / 1e9
            for name, t in peers.items():
                print(
                    f"{dtype:>6} {nq:>7} {name:>8} {t:8.3f} {ours:9.3f} {t / ours:6.2f}"
                    f" {gflops:15.1f} {100 * gflops / peak:6.1f}%"
                )
            fastest = min(peers.values())
            print(
                f"{'':>6} {'':>7} {'fastest':>8} {fastest:8.3f} {ours:9.3f} {fastest / ours:6.2f}"
            )


if __name__ == "__main__":
    main()
