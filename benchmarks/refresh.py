"""Index refresh: the on-device path (token tables already on the devices, output born in the
index layout, old index donated) against the host path of earlier jaxret (memmap rows →
device → host → second upload), on the demo's corpus and model.

    python benchmarks/refresh.py [--variant demo] [--repeats 3]

Prints passages/s of each and the ratio (> 1 = the device path is faster).
"""

import argparse

from common import best_time, cpu_devices_per_core

cpu_devices_per_core()

import jax  # noqa: E402

from jaxret.configlib import load_config  # noqa: E402
from jaxret.data.tokenization import load_tokenizer  # noqa: E402
from jaxret.index.encode import empty_index, encode_corpus, passage_table, refresh_index  # noqa: E402
from jaxret.index.gather import device_table, memmap_rows  # noqa: E402
from jaxret.index.mips import RowLayout  # noqa: E402
from jaxret.models import dual_encoder as de  # noqa: E402
from jaxret.parallel import make_mesh  # noqa: E402
from jaxret.train.art_data import load_art_data  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="demo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--store", default="/tmp/jaxret_bench_refresh_store")
    args = p.parse_args()
    cfg = load_config(f"configs/art.py:{args.variant}")
    mesh = make_mesh()
    data = load_art_data(cfg.data)
    spec = de.EncoderSpec.from_config(cfg.model)
    encoder, params, tok_folder = de.from_pretrained(cfg.model.name, spec)
    table = passage_table(args.store, data.corpus, encoder, load_tokenizer(tok_folder))
    n = len(table)
    layout = RowLayout.for_mesh(n, mesh, cfg.encode.chunk_rows)
    tables = {
        "input_ids": device_table(
            memmap_rows(table.arrays["input_ids"], n), layout, mesh, table.arrays["input_ids"].dtype
        )
    }
    params = jax.device_put(params)
    holder = {"index": empty_index(layout, mesh, encoder.dim, cfg.encode.index_dtype)}

    def device_path():
        holder["index"] = refresh_index(
            encoder, params, tables, holder["index"], cfg.encode.device_batch
        )
        holder["index"].embeddings.block_until_ready()

    def host_path():
        index = encode_corpus(
            encoder, params, table, mesh, cfg.encode.batch_size, cfg.encode.index_dtype, desc=None
        )
        index.embeddings.block_until_ready()

    t_dev = best_time(device_path, args.repeats)
    t_host = best_time(host_path, args.repeats)
    print(f"{args.variant}: {n} passages × {spec.max_passage_length} tokens, {mesh.size} devices")
    print(f"  host path   {n / t_host:8.1f} passages/s  ({t_host:.2f} s)")
    print(f"  device path {n / t_dev:8.1f} passages/s  ({t_dev:.2f} s)")
    print(f"  ratio (host time / device time): {t_host / t_dev:.2f}")


if __name__ == "__main__":
    main()
