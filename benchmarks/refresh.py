"""Index refresh benchmarks.

python benchmarks/refresh.py throughput [--variant demo] [--repeats 3]
    the on-device path (token tables already on the devices, output born in the index
    layout, old index donated) against the host path of earlier jaxret (memmap rows →
    device → host → second upload): passages/s of each and the ratio (> 1 = device faster).

python benchmarks/refresh.py modes [--seeds 0 1] [--steps 200] [--modes sync fused separate]
    the demo run with art.refresh=sync (`demo`) and =rolling (`demo_rolling`), the rolling
    slice either inside the train step (`fused`) or a second program after it (`separate`),
    each a fresh `jaxret train` process: per-step wall time (train step + refresh) p50 / p99 /
    max, the slowest step over the median, total wall time, and the held-out test top-k.

python benchmarks/refresh.py programs [--rounds 6] [--steps 15]
    the two rolling programs side by side in one process on the demo_rolling run: rounds of
    `--steps` steps each, alternating which goes first, timed as the loop runs them (the
    step's metrics fetched, then after_step); per-step median and p90 of each and the ratio.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import best_time, cpu_devices_per_core

cpu_devices_per_core()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxret.configlib import load_config  # noqa: E402
from jaxret.data.tokenization import load_tokenizer  # noqa: E402
from jaxret.index.encode import empty_index, encode_corpus, passage_table, refresh_index  # noqa: E402
from jaxret.index.gather import device_table, memmap_rows  # noqa: E402
from jaxret.index.mips import RowLayout  # noqa: E402
from jaxret.methods.art.data import load_art_data  # noqa: E402
from jaxret.models import dual_encoder as de  # noqa: E402
from jaxret.parallel import make_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def throughput(args):
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


# mode → (configs/art.py variant, overrides)
MODES = {
    "sync": ("demo", ()),
    "fused": ("demo_rolling", ("--config.art.rolling_program=fused",)),
    "separate": ("demo_rolling", ("--config.art.rolling_program=separate",)),
}


def run_mode(mode: str, seed: int, steps: int, workdir: Path) -> dict:
    variant, overrides = MODES[mode]
    cmd = [
        sys.executable,
        "-m",
        "jaxret.cli",
        "train",
        f"--config=configs/art.py:{variant}",
        *overrides,
        f"--config.seed={seed}",
        f"--config.train.steps={steps}",
        "--config.train.progress=false",
        "--config.eval.test_baseline=false",
        "--workdir",
        str(workdir),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    wall = np.array([r["wall_seconds"] for r in rows if r["kind"] == "train"])  # [steps]
    test = [r for r in rows if r["kind"] == "test"][-1]
    return {"wall": wall, "total": total, "test": test}


def modes(args):
    print(f"ART demo, {args.steps} steps, seeds {args.seeds}; per-step wall = step + refresh")
    head = f"{'mode':>8} {'seed':>4} {'step 1':>6} {'p50 s':>6} {'p99 s':>6} {'max s':>6}"
    print(head + f" {'max/p50':>7} {'total s':>8} {'top1':>6} {'top5':>6} {'top20':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for seed in args.seeds:
            for mode in args.modes:
                r = run_mode(mode, seed, args.steps, out / f"{mode}-{seed}")
                first, w, t = r["wall"][0], r["wall"][1:], r["test"]
                p50, p99 = np.percentile(w, 50), np.percentile(w, 99)
                print(
                    f"{mode:>8} {seed:>4} {first:6.1f} {p50:6.2f} {p99:6.2f} {w.max():6.2f} "
                    f"{w.max() / p50:7.2f} {r['total']:8.1f} {t.get('top1', np.nan):6.3f} "
                    f"{t.get('top5', np.nan):6.3f} {t.get('top20', np.nan):6.3f}",
                    flush=True,
                )


def programs(args):
    from jaxret.methods.art.runner import ArtRun

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for program in ("fused", "separate"):
            cfg = load_config("configs/art.py:demo_rolling", [("art.rolling_program", program)])
            runs[program] = ArtRun(cfg, Path(tmp) / program)
        done = {p: 0 for p in runs}
        times: dict[str, list[float]] = {p: [] for p in runs}

        def advance(program: str, steps: int, record: bool) -> None:
            run = runs[program]
            for _ in range(steps):
                t0 = time.perf_counter()
                run.state, metrics = run.train_step(run.state, run.batch_at(done[program]))
                jax.device_get(metrics)
                done[program] += 1
                run.after_step(run.state, done[program])
                run.refresh.index.embeddings.block_until_ready()
                if record:
                    times[program].append(time.perf_counter() - t0)

        for p in runs:  # compile
            advance(p, 2, record=False)
        order = list(runs)
        for _ in range(args.rounds):
            for p in order:
                advance(p, args.steps, record=True)
            order.reverse()
    n = args.rounds * args.steps
    print(f"demo_rolling, {n} timed steps per program ({args.rounds} alternating rounds)")
    for p, t in times.items():
        print(f"  {p:>8}: median {np.median(t):.3f} s/step  p90 {np.percentile(t, 90):.3f} s")
    ratio = np.median(times["separate"]) / np.median(times["fused"])
    print(f"  ratio (separate / fused median): {ratio:.3f}  (> 1: fused faster)")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--variant", default="demo")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--store", default="/tmp/jaxret_bench_refresh_store")
    m = sub.add_parser("modes")
    m.add_argument("--seeds", type=int, nargs="+", default=[0])
    m.add_argument("--steps", type=int, default=200)
    m.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    m.add_argument("--out", help="keep the runs' workdirs here")
    g = sub.add_parser("programs")
    g.add_argument("--rounds", type=int, default=6)
    g.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    {"throughput": throughput, "modes": modes, "programs": programs}[args.command](args)


if __name__ == "__main__":
    main()
