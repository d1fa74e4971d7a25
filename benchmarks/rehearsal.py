"""ART's whole system at the paper's ratios, on CPU: what a pod run would meet, measured.

    python benchmarks/rehearsal.py [--passages 2000000] [--steps 1100] [--processes 4]
        [--devices 2] [--device-cores 0] [--workdir /tmp/jaxret-rehearsal]

The paper's NQ run: 21M passages on 16 devices, 64 questions × K 32 (4 per device), a
re-index every 500 steps. Here: `--passages` synthetic short passages on `--processes` ×
`--devices` fake CPU devices (jax.distributed on 127.0.0.1), 4 questions per device × K 32,
refresh_every 500, a 2-layer BERT of width 64 and a 2-layer T5 teacher run layer by layer
(FSDP). Every phase runs the real code paths through the CLI:

  1. `jaxret prepare` with 1 and 2 workers (store build time, passages/s);
  2. training with sync refresh, `--steps` steps, dev evaluation and checkpoints every 250;
  3. training with rolling refresh: SIGTERM to every process at step ~steps−100 (as SLURM
     does), the time until the processes have saved and exited, and the resume to the end.

Per-step times come from metrics.jsonl: `wall_seconds` (the step and its refresh work) and the
gaps between consecutive steps' rows (everything in between: evaluations, checkpoints). Peak
RSS is each process's VmHWM, polled from /proc. `--device-cores` pins XLA's device threads to
those cores and everything else to the others (`benchmarks/pinned.py`), as an accelerator
host separates the devices from the host's cores. One markdown table is printed; docs/scaling.md's
scaling section gives it with the extrapolation to the paper's sizes.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny-model builders (PyTorch-saved)


def write_data(folder: Path, passages: int, seed: int = 0) -> None:
    """A BEIR folder: `passages` passages of 6–12 words drawn from MiniLM's vocabulary, train
    questions (4 words of a passage plus 2 others), dev and test questions with qrels to the
    passage they were drawn from."""
    from conftest import minilm_path

    vocab = [
        w
        for w in (minilm_path() / "vocab.txt").read_text().split("\n")
        if w.isalpha() and w.isascii() and len(w) > 2
    ][:20000]
    words = np.array(vocab)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(6, 13, passages)
    table = np.empty((passages, 12), np.int32)  # word ids of every passage, for the questions
    with open(folder / "corpus.jsonl", "w") as f:
        for start in range(0, passages, 100_000):
            block = rng.integers(0, len(words), (min(100_000, passages - start), 12))
            table[start : start + len(block)] = block
            for i, row in enumerate(block, start):
                text = " ".join(words[row[: lengths[i]]])
                f.write(json.dumps({"_id": f"p{i}", "title": f"t{i % 997}", "text": text}) + "\n")

    def question(i: int, salt: int) -> str:
        r = np.random.default_rng([seed, salt, i])
        own = r.choice(table[i, : lengths[i]], 4, replace=False)
        return " ".join(words[np.concatenate([own, r.integers(0, len(words), 2)])])

    train = rng.choice(passages, min(20_000, passages), replace=False)
    with open(folder / "train_questions.jsonl", "w") as f:
        for j, i in enumerate(train):
            f.write(json.dumps({"_id": f"train-{j}", "text": question(int(i), 0)}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "queries.jsonl", "w") as q:
        for salt, split in ((1, "dev"), (2, "test")):
            rows = rng.choice(passages, min(200, passages), replace=False)
            with open(folder / "qrels" / f"{split}.tsv", "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for j, i in enumerate(rows):
                    qid = f"{split}-{j}"
                    q.write(json.dumps({"_id": qid, "text": question(int(i), salt)}) + "\n")
                    f.write(f"{qid}\tp{i}\t1\n")


def models(folder: Path) -> tuple[Path, Path]:
    from conftest import T5_TEXTS, save_tiny_bert, save_tiny_t5

    bert = folder / "bert"
    t5 = folder / "t5"
    if not (bert / "config.json").exists():
        save_tiny_bert(bert, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    if not (t5 / "config.json").exists():
        save_tiny_t5(t5, T5_TEXTS, gated=True)
    return bert, t5


def overrides(data: Path, bert: Path, t5: Path, store: Path, args, refresh: str) -> list[str]:
    devices = args.processes * args.devices
    every = args.every
    return [
        "--config=configs/art.py:tiny",
        f"--config.model.name={bert}",
        "--config.data.protocol=files",
        f"--config.data.dir={data}",
        f"--config.data.train_questions={data / 'train_questions.jsonl'}",
        "--config.data.max_docs=0",
        "--config.data.max_eval_queries=200",
        f"--config.data.store={store}",
        "--config.model.max_passage_length=16",
        "--config.art.top_k=32",
        f"--config.art.refresh={refresh}",
        "--config.teacher.kind=t5",
        f"--config.teacher.model={t5}",
        "--config.teacher.dtype=float32",
        "--config.teacher.param_sharding=fsdp",
        "--config.teacher.max_passage_length=64",
        "--config.teacher.max_question_length=32",
        "--config.teacher.chunk_pairs=32",
        "--config.encode.device_batch=512",
        "--config.encode.chunk_rows=32768",
        f"--config.train.batch_size={4 * devices}",
        f"--config.train.steps={args.steps}",
        f"--config.train.refresh_every={args.refresh_every}",
        f"--config.train.eval_every={every}",
        f"--config.train.checkpoint_every={every}",
        f"--config.train.compile_cache={args.compile_cache}",  # as the launch scripts run it
        "--config.train.keep_checkpoints=2",
        "--config.eval.test_baseline=false",
        "--config.eval.metric=ndcg@10",
        f"--config.eval.slices={args.eval_slices}",
    ]


def env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }


def jaxret(*argv: str) -> list[str]:
    return [sys.executable, "-m", "jaxret.cli", *argv]


def prepare(flags: list[str], workdir: Path, workers: int, devices: int) -> float:
    t0 = time.perf_counter()
    cmd = jaxret("prepare", *flags, "--workdir", str(workdir), "--workers", str(workers))
    subprocess.run(cmd, env=env(devices), cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int | str, key: str) -> int:
    """Bytes of `key` ("VmHWM": peak RSS; "RssAnon": anonymous memory now) of a process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_sample(pids: list[int]) -> tuple[float, ...]:
    """(unix time, core-seconds the machine spent busy, of them stolen by the hypervisor,
    of them the run's processes', core-seconds idle waiting for the disk, the run's major
    page faults, MB dirty or under writeback) from /proc: the CPU beside the run is busy −
    ours; the last three show whether a slow step waited for the disk (the mapped store
    read back, or the kernel writing a checkpoint's pages back)."""
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _, iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    ours = majflt = 0
    for pid in pids:
        try:  # majflt, utime, stime: fields 12, 14, 15, counted after the ")" ending the name
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])
            majflt += int(fields[9])
        except (OSError, IndexError):
            pass
    meminfo = dict(x.split(":", 1) for x in Path("/proc/meminfo").read_text().splitlines())
    dirty_kb = sum(int(meminfo[k].split()[0]) for k in ("Dirty", "Writeback"))
    busy = user + nice + system + irq + softirq + steal
    return time.time(), busy / hz, steal / hz, ours / hz, iowait / hz, majflt, dirty_kb / 1024


def cpu_beside(samples: list[tuple], stats: dict) -> dict:
    """In the gaps of `step_stats`' slow steps and of its other steps: cores busy beside the
    run (other processes and the kernel), the hypervisor's steal, cores idle waiting for the
    disk, the run's major faults per second, and the most MB dirty or under writeback. Each
    interval between two samples counts for the step whose gap holds its midpoint."""
    times, slow, counted = stats["times"], stats["slow"], stats["gap_steps"]
    steps = sorted(times)
    ends = np.array([times[s] for s in steps])
    # seconds, other core-s, steal core-s, iowait core-s, major faults; most dirty MB
    sums = {True: np.zeros(5), False: np.zeros(5)}
    dirty = {True: 0.0, False: 0.0}
    for (t0, b0, s0, o0, w0, f0, _), (t1, b1, s1, o1, w1, f1, d1) in zip(samples, samples[1:]):
        i = int(np.searchsorted(ends, (t0 + t1) / 2))
        if i == 0 or i >= len(steps) or steps[i] not in counted or o1 < o0:
            continue  # before the first step, after the last, a restart's gap
        other = (b1 - b0) - (s1 - s0) - (o1 - o0)
        sums[steps[i] in slow] += (t1 - t0, other, s1 - s0, w1 - w0, f1 - f0)
        dirty[steps[i] in slow] = max(dirty[steps[i] in slow], d1)

    def rates(slow_ones: bool) -> tuple[float, ...]:
        v = sums[slow_ones]
        if not v[0]:
            return (float("nan"),) * 5
        return (*(v[1:] / v[0]), dirty[slow_ones])

    return {"slow": rates(True), "rest": rates(False)}


def runtime_rss(devices: int) -> int:
    """Anonymous memory of a process that imported what a training process imports and made
    its devices, before any data or model: JAX, XLA and the libraries, nobody's share."""
    code = (
        "import jax, jax.numpy as jnp, orbax.checkpoint, tensorboardX, transformers, "
        "jaxret.cli, jaxret.methods.art.runner, jaxret.train.loop; "
        "jax.jit(lambda x: x * 2)(jnp.ones(8)).block_until_ready(); "
        "print([x for x in open('/proc/self/status') if x.startswith('RssAnon:')][0].split()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env(devices), cwd=ROOT, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1]) * 1024


def process_share(store: Path, run: Path, args) -> dict[str, float]:
    """Bytes one process holds by design: its share of the corpus tokens (the token ids of the
    retriever's and the teacher's tables; masks and type ids count against it), of the index
    (on CPU the devices' memory is the host's) and its devices' copies of the model state
    (an upper bound: replicated). The text table is memory-mapped (file pages, not counted)."""
    tables = sum(f.stat().st_size for f in store.glob("*/input_ids.npy"))
    cfg = json.loads((run / "config.json").read_text())  # flat: "model.name", …
    hidden = json.loads((Path(cfg["model.name"]) / "config.json").read_text())["hidden_size"]
    itemsize = 2 if cfg["encode.index_dtype"] == "bfloat16" else 4
    index = args.passages * hidden * itemsize
    newest = max(
        (c for c in (run / "checkpoints").iterdir() if c.name.isdigit()), key=lambda c: int(c.name)
    )
    state = size(newest / "state") * args.devices
    return {
        "tokens": tables / args.processes,
        "index": index / args.processes,
        "state": state,
    }


class Job:
    """`--processes` training processes of one run, watched: peak RSS per process, and an
    optional SIGTERM to all of them once metrics.jsonl reaches `term_at`."""

    def __init__(self, flags: list[str], workdir: Path, args, log: Path):
        port = free_port()
        self.workdir, self.start = workdir, time.time()
        self.procs = []
        for pid in range(args.processes):
            dist = [
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={args.processes}",
                f"--config.distributed.process_id={pid}",
            ]
            argv = ["train", *flags, *dist, "--workdir", str(workdir)]
            cmd = jaxret(*argv)
            if args.device_cores:  # XLA's threads on these cores, all others on the rest
                cmd = [sys.executable, str(ROOT / "benchmarks/pinned.py"), args.device_cores, *argv]
            out = open(log.with_suffix(f".{pid}.log"), "a")
            self.procs.append(
                subprocess.Popen(cmd, env=env(args.devices), cwd=ROOT, stdout=out, stderr=out)
            )
        self.rss = [0] * len(self.procs)
        self.anon = [0] * len(self.procs)  # peak anonymous RSS, polled
        self.anon_at = [0.0] * len(self.procs)  # when (unix seconds) each peak was seen
        # Peak anonymous RSS once two steps of this job have run: what a process holds while
        # it trains, without the start's transients (the start's encoding and evaluation;
        # until the step was compiled ahead, also its compilation on top of the index:
        # +0.4 GB for ~5 s, docs/scaling.md).
        self.anon_training = [0] * len(self.procs)
        self.cpu: list[tuple] = []  # cpu_sample at every poll
        self.first_step = self.last_step()

    def last_step(self) -> int:
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return 0
        lines = path.read_text().splitlines()
        steps = [json.loads(x)["step"] for x in lines[-5:] if '"train"' in x]
        return max(steps, default=0)

    def wait(self, term_at: int | None = None) -> float | None:
        """→ seconds from SIGTERM to every process exiting (None without a SIGTERM)."""
        termed = None
        while any(p.poll() is None for p in self.procs):
            self.rss = [max(r, proc_status(p.pid, "VmHWM")) for r, p in zip(self.rss, self.procs)]
            step = self.last_step()
            self.cpu.append(cpu_sample([p.pid for p in self.procs]))
            for i, p in enumerate(self.procs):
                now = proc_status(p.pid, "RssAnon")
                if now > self.anon[i]:
                    self.anon[i], self.anon_at[i] = now, time.time()
                if step >= self.first_step + 2:
                    self.anon_training[i] = max(self.anon_training[i], now)
            if term_at is not None and termed is None and step >= term_at:
                termed = time.time()
                for p in self.procs:
                    p.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        codes = [p.returncode for p in self.procs]
        if any(codes):
            raise SystemExit(f"{self.workdir}: exit codes {codes}; see the .log files beside it")
        return None if termed is None else time.time() - termed


def rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def when(workdir: Path, t: float) -> str:
    """Where a run was at unix time `t`: after which logged train step (or before the
    first), so that a memory peak can be traced to its phase."""
    done = [x["step"] for x in rows(workdir) if x["kind"] == "train" and x["time"] <= t]
    after = [x for x in rows(workdir) if x["time"] > t]
    nxt = f", before step {after[0]['step']} {after[0]['kind']}" if after else ""
    return (f"after step {done[-1]}" if done else "before the first step") + nxt


def step_stats(
    workdir: Path, restarts: tuple[int, ...] = (0,), first: int = 2, busy: set[int] = frozenset()
) -> dict:
    """Step times, leaving out the `first` steps after each (re)start (compilation):
    wall_seconds and the gaps between consecutive train rows (evaluations and checkpoints
    included; the gap across a restart left out). `busy`: the steps whose gap carries an
    evaluation part or a checkpoint; the other ("plain") steps show the machine's own noise
    (4 processes on 2 shared cores)."""
    r = rows(workdir)
    warm = lambda s: not any(0 <= s - 1 - start < first for start in restarts)
    train = [x for x in r if x["kind"] == "train" and warm(x["step"])]
    wall = np.array([x["wall_seconds"] for x in train])
    times = {x["step"]: x["time"] for x in r if x["kind"] == "train"}
    steps = [s for s in sorted(times) if s - 1 in times and warm(s)]
    gaps = np.array([times[s] - times[s - 1] for s in steps])
    plain = np.array([g for s, g in zip(steps, gaps) if s not in busy])
    at_work = [(g, s) for s, g in zip(steps, gaps) if s in busy] or [(float("nan"), 0)]
    return {
        "p50": float(np.median(wall)),
        "p99": float(np.percentile(wall, 99)),
        "max": float(wall.max()),
        "gap_p50": float(np.median(gaps)),
        "gap_p99": float(np.percentile(gaps, 99)),
        "gap_max": float(gaps.max()),
        "gap_max_step": int(steps[int(np.argmax(gaps))]) if len(gaps) else 0,
        "plain_p99": float(np.percentile(plain, 99)),
        "plain_max": float(plain.max()),
        "busy_max": float(max(at_work)[0]),
        "busy_max_step": int(max(at_work)[1]),
        "total": float(max(times.values()) - min(times.values())),
        "times": times,
        "gap_steps": set(steps),
        "slow": {s for s, g in zip(steps, gaps) if g > 1.5 * np.median(gaps)},
    }


def busy_steps(steps: int, every: int, slices: int) -> set[int]:
    """Steps whose gap holds a checkpoint or a dev evaluation's part: each evaluation and
    checkpoint step e (every `every`), and the `slices` + 2 steps after it (its parts: the
    first after the step after the checkpoint, one search slice after each later step)."""
    return {e + i for e in range(every, steps + 1, every) for i in range(1, slices + 3)}


def dev_cost(workdir: Path) -> float:
    """Median seconds a dev evaluation held the training thread, all its parts (the loop's
    `eval_seconds`; spread over `eval.slices` steps)."""
    held = [x["eval_seconds"] for x in rows(workdir) if x["kind"] == "dev"]
    return float(np.median(held)) if held else float("nan")


def checkpoint_hold(workdir: Path) -> tuple[float, float]:
    """Median and max seconds a checkpoint save held the training thread (the loop's
    `checkpoint_seconds` events; the write itself goes on in the background)."""
    held = [x["checkpoint_seconds"] for x in rows(workdir) if "checkpoint_seconds" in x]
    return (float(np.median(held)), float(max(held))) if held else (float("nan"),) * 2


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=2_000_000)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--devices", type=int, default=2, help="fake CPU devices per process")
    p.add_argument(
        "--device-cores",
        default="",
        help="e.g. 0: XLA's device threads on these cores, every other thread (checkpoint "
        "writes, host work) on the rest, as on an accelerator host (benchmarks/pinned.py)",
    )
    p.add_argument("--prepare-rate-passages", type=int, default=200_000)
    p.add_argument("--refresh-every", type=int, default=500)
    p.add_argument("--every", type=int, default=250, help="dev evaluation and checkpoint")
    p.add_argument(
        "--eval-slices",
        type=int,
        default=8,
        help="a dev evaluation's steps (eval.slices). A slice costs a scan of the process's "
        "rows plus its questions (here, 3.5M rows per process: ~0.14 s + 6 ms per "
        "question), so more slices shorten each by less and stall longer in all (50 "
        "slices: 9.3 s held, against 3.5 s in 8; docs/scaling.md)",
    )
    p.add_argument(
        "--compile-cache",
        default="compile_cache",
        help='train.compile_cache of the runs (as the launch scripts set it; "" off)',
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/jaxret-rehearsal"))
    p.add_argument(
        "--modes",
        default="sync,rolling",
        help="training runs, comma-separated (empty: only the data and the store)",
    )
    args = p.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    data = w / f"data-{args.passages}"
    if not (data / "qrels" / "test.tsv").exists():
        t0 = time.perf_counter()
        write_data(data, args.passages)
        print(f"data: {args.passages:,} passages written in {time.perf_counter() - t0:.0f} s")
    bert, t5 = models(w / "models")
    table: list[tuple[str, str]] = []

    # 1. The store, before any training process starts.
    if args.prepare_rate_passages:  # 0: skip (a rerun of the training phases)
        small = w / f"data-{args.prepare_rate_passages}"
        if not (small / "qrels" / "test.tsv").exists():
            write_data(small, args.prepare_rate_passages)
        for workers in (1, 2):
            store = w / f"store-rate-{workers}"
            shutil.rmtree(store, ignore_errors=True)
            flags = overrides(small, bert, t5, store, args, "sync")
            seconds = prepare(flags, w / "prep", workers, args.devices)
            table.append(
                (
                    f"prepare, {workers} worker(s), {args.prepare_rate_passages:,} passages",
                    f"{seconds:.0f} s, {args.prepare_rate_passages / seconds:,.0f} passages/s",
                )
            )
            print(table[-1], flush=True)
    store = w / "store"
    if not (store / "complete").exists():
        seconds = prepare(overrides(data, bert, t5, store, args, "sync"), w / "prep", 2, 2)
        table.append(
            (
                f"prepare, 2 workers, {args.passages:,} passages",
                f"{seconds:.0f} s, {args.passages / seconds:,.0f} passages/s",
            )
        )
        (store / "complete").write_text("")
        print(table[-1], flush=True)

    # 2. Sync refresh, the paper's.
    results = {}
    for refresh in [m for m in args.modes.split(",") if m]:
        run = w / f"train-{refresh}"
        shutil.rmtree(run, ignore_errors=True)
        flags = overrides(data, bert, t5, store, args, refresh)
        job = Job(flags, run, args, w / f"{refresh}")
        term, restarts = None, (0,)
        if refresh == "rolling":
            term_at = args.steps - min(100, args.steps // 5)
            term = job.wait(term_at=term_at)
            stopped = job.last_step()
            ckpts = sorted(int(c.name) for c in (run / "checkpoints").iterdir() if c.name.isdigit())
            table.append(
                (
                    "rolling: SIGTERM → saved and exited",
                    f"{term:.1f} s (signal at step ≥ {term_at}, saved step {ckpts[-1]})",
                )
            )
            assert ckpts[-1] == stopped, (ckpts, stopped)
            restarts = (0, stopped)
            first_rss, first_anon, first_at = job.rss, job.anon, job.anon_at  # to the SIGTERM
            first_training, first_cpu = job.anon_training, job.cpu
            t0 = time.time()
            job = Job(flags, run, args, w / f"{refresh}")
            while job.last_step() <= stopped and all(p.poll() is None for p in job.procs):
                time.sleep(0.2)
            resumed = time.time() - t0
            job.wait()
            cache = [x for x in rows(run) if "compile_cache_read" in x]  # process 0's
            read = (
                f" (programs read from the compile cache: {cache[-1]['compile_cache_read']:.0f}"
                f" of {cache[-1]['compile_cache_looked_up']:.0f})"
                if cache
                else ""
            )
            table.append(("rolling: resume to the next step", f"{resumed:.1f} s{read}"))
            runtime = runtime_rss(args.devices)
            table.append(
                (
                    "rolling: peak anonymous RSS − runtime, run to the SIGTERM / resumed run",
                    " / ".join(f"{(a - runtime) / 1e9:.2f} GB" for a in first_anon + job.anon),
                )
            )
            table.append(
                (
                    "rolling: when each process peaked, run to the SIGTERM / resumed run",
                    " / ".join(when(run, t) for t in first_at + job.anon_at),
                )
            )
            job.rss = [max(a, b) for a, b in zip(job.rss, first_rss)]
            job.anon = [max(a, b) for a, b in zip(job.anon, first_anon)]
            job.anon_training = [max(a, b) for a, b in zip(job.anon_training, first_training)]
            job.cpu = first_cpu + job.cpu
        else:
            first = time.time()
            while job.last_step() < 1 and all(p.poll() is None for p in job.procs):
                time.sleep(0.2)
            table.append(
                ("sync: start to first step (all processes)", f"{time.time() - first:.1f} s")
            )
            job.wait()
        busy = busy_steps(args.steps, args.every, args.eval_slices)
        if refresh == "rolling":  # the resume's first checkpoint and evaluation steps too
            busy |= {restarts[-1] + i for i in range(1, 3)}
        s = step_stats(run, restarts, busy=busy)
        results[refresh] = s
        table.append(
            (
                f"{refresh}: step wall p50 / p99 / max",
                f"{s['p50']:.3f} / {s['p99']:.3f} / {s['max']:.3f} s",
            )
        )
        table.append(
            (
                f"{refresh}: step-to-step gap p50 / p99 / max (evals, checkpoints in)",
                f"{s['gap_p50']:.3f} / {s['gap_p99']:.3f} / {s['gap_max']:.3f} s (max at step "
                f"{s['gap_max_step']}; {s['gap_max'] / s['gap_p50']:.2f}× p50)",
            )
        )
        table.append(
            (
                f"{refresh}: longest gap at a step with an evaluation part or a checkpoint / "
                "at a plain step (p99)",
                f"{s['busy_max']:.3f} s at step {s['busy_max_step']} "
                f"({s['busy_max'] / s['gap_p50']:.2f}× p50) / {s['plain_max']:.3f} s "
                f"({s['plain_max'] / s['gap_p50']:.2f}× p50; p99 {s['plain_p99']:.3f} s)",
            )
        )
        beside = cpu_beside(job.cpu, s)
        (run / "cpu_samples.json").write_text(json.dumps(job.cpu))  # to look at a gap later
        table.append(
            (
                f"{refresh}: in the gaps above 1.5 × p50 / in the others: cores busy beside "
                "the run (other processes, kernel); hypervisor steal; cores waiting for the "
                "disk; the run's major faults/s; most MB dirty or under writeback",
                " / ".join(
                    "{:.2f}; {:.2f}; {:.2f}; {:.1f}; {:.0f}".format(*beside[k])
                    for k in ("slow", "rest")
                ),
            )
        )
        table.append(
            (
                f"{refresh}: dev evaluation, training thread held (over {args.eval_slices} steps)",
                f"{dev_cost(run):.2f} s",
            )
        )
        held = checkpoint_hold(run)
        table.append(
            (
                f"{refresh}: checkpoint, training thread held p50 / max",
                f"{held[0]:.2f} / {held[1]:.2f} s",
            )
        )
        table.append((f"{refresh}: whole run", f"{s['total'] / 60:.1f} min"))
        ckpt = max(
            (c for c in (run / "checkpoints").iterdir() if c.name.isdigit()),
            key=lambda c: int(c.name),
        )
        row_dir = ckpt.parent / f"rows-{ckpt.name}"  # the rolling index beside its step
        rows_bytes = size(row_dir) if row_dir.is_dir() else 0
        table.append(
            (
                f"{refresh}: checkpoint size",
                f"{(size(ckpt) + rows_bytes) / 1e6:.0f} MB (index rows {rows_bytes / 1e6:.0f} MB)",
            )
        )
        table.append(
            (
                f"{refresh}: peak RSS per process",
                " / ".join(f"{r / 1e9:.2f}" for r in job.rss) + " GB",
            )
        )
        # The bar: RSS ≤ 1.5 × (the process's share of the tokens + model state).
        # On CPU the devices' memory is host memory, so the index share counts too, and
        # the runtime (JAX, XLA, libraries: ~1.3 GB, nobody's share) is taken off.
        runtime = runtime_rss(args.devices)
        share = process_share(store, run, args)
        mine = sum(share.values())
        table.append(
            (
                f"{refresh}: peak anonymous RSS − runtime ({runtime / 1e9:.2f} GB) per process, "
                f"against its share (tokens {share['tokens'] / 1e9:.2f} + index "
                f"{share['index'] / 1e9:.2f} + model state {share['state'] / 1e9:.3f} GB)",
                " / ".join(
                    f"{(a - runtime) / 1e9:.2f} GB ({(a - runtime) / mine:.2f}×)" for a in job.anon
                ),
            )
        )
        table.append(
            (
                f"{refresh}: the same from the third step on (the start's transients left out)",
                " / ".join(
                    f"{(a - runtime) / 1e9:.2f} GB ({(a - runtime) / mine:.2f}×)"
                    for a in job.anon_training
                ),
            )
        )
        print("\n".join(f"{a}: {b}" for a, b in table[-10:]), flush=True)
    if "sync" in results:
        sync_refresh = [
            x["wall_seconds"]
            for x in rows(w / "train-sync")
            if x["kind"] == "train" and x["step"] % args.refresh_every == 0
        ]
        table.append(
            (
                f"sync: refresh steps (every {args.refresh_every})",
                ", ".join(f"{x:.1f} s" for x in sync_refresh),
            )
        )
    tokens = size(store)
    table.append(("store on disk (text table + both token tables)", f"{tokens / 1e9:.2f} GB"))

    print(
        f"\n{args.processes} processes × {args.devices} CPU devices, {args.passages:,} "
        f"passages, {args.steps} steps, refresh_every {args.refresh_every}, 4 questions × K 32 "
        "per device "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)\n"
    )
    print("| measured | value |\n|---|---|")
    for k, v in table:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
