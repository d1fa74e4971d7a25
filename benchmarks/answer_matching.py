"""DPR's answer matching (top-k accuracy on QA data) in the training thread against
`eval.answer_workers` processes beside it.

    python benchmarks/answer_matching.py [--passages 200000] [--questions 2000] [--workers 1,2]

Top-k accuracy tokenizes every retrieved passage with DrQA's simple tokenizer (Python) and
looks for each answer's tokens in it. NQ dev is 8,757 questions × 100 passages: at the
passages/s printed here, the seconds every process of a run spent in it at every dev
evaluation, the training thread held (`eval.answer_workers=0`). With workers, the thread
holds only while the work is sent (the questions' rows; the store's text table goes as the
files it maps) and the matching runs beside the next steps. The passages: `--passages`
synthetic 100-word passages (Wikipedia's DPR passages are 100 words) in a store text table,
memory-mapped as in a prepared run; each question retrieves 100 of them at random, one
holding its 2-word answer.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxret.data.corpus_text import stored_corpus, write_text_table
from jaxret.data.readers import Corpus
from jaxret.eval import qa

NQ_DEV = 8_757 * 100  # NQ dev questions × passages retrieved (DPR's nq-dev.csv)


def case(passages: int, questions: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = np.array([f"{a}{b}" for a in ("ka", "to", "mi", "re", "su") for b in range(2000)])
    texts = [" ".join(rng.choice(vocab, 100)) for _ in range(passages)]
    rows = rng.integers(0, passages, (questions, 100))
    answers = []
    for i in range(questions):
        words = texts[rows[i, rng.integers(0, 100)]].split()
        j = int(rng.integers(0, 99))
        answers.append([" ".join(words[j : j + 2])])
    return texts, rows, answers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=200_000)
    p.add_argument("--questions", type=int, default=2_000)
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    texts, rows, answers = case(args.passages, args.questions)
    types = ["string"] * len(answers)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus.jsonl"
        source.write_text("")  # the text table records the source file's identity only
        corpus = Corpus([f"d{i}" for i in range(len(texts))], [""] * len(texts), texts)
        write_text_table(Path(tmp) / "store", source, corpus)
        stored = stored_corpus(Path(tmp) / "store", source).texts
        pairs = rows.size
        print(
            f"{args.questions:,} questions × 100 passages ({pairs:,} pairs), "
            f"{len(np.unique(rows)):,} distinct passages of {args.passages:,}"
        )
        t0 = time.perf_counter()
        expected = qa.hits_matrix(answers, types, rows, stored)
        alone = time.perf_counter() - t0
        print(
            f"training thread (answer_workers=0): {alone:.2f} s held, "
            f"{pairs / alone:,.0f} pairs/s; NQ dev: {NQ_DEV / pairs * alone:.0f} s held"
        )
        for w in [int(x) for x in args.workers.split(",")]:
            matcher = qa.AnswerMatcher(w)
            matcher.submit(answers[:w], types[:w], rows[:w], stored).result()  # start them
            t0 = time.perf_counter()
            matching = matcher.submit(answers, types, rows, stored)
            held = time.perf_counter() - t0
            hits = matching.result()
            wall = time.perf_counter() - t0
            matcher.close()
            assert (hits == expected).all()
            print(
                f"answer_workers={w}: {held:.3f} s held, {wall:.2f} s to the result "
                f"({alone / wall:.2f}× the thread's speed); NQ dev: "
                f"{NQ_DEV / pairs * held:.2f} s held, {NQ_DEV / pairs * wall:.0f} s beside steps"
            )


if __name__ == "__main__":
    main()
