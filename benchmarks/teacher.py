"""Question scoring throughput of the T5 teacher: jaxret vs PyTorch transformers on the same
T5-small-shaped random model (d_model 512, 6+6 layers, vocab 32128), pairs and lengths.

    python benchmarks/teacher.py [--pairs 32] [--passage-length 256] [--question-length 32]
"""

import argparse
import tempfile

from common import best_time, cpu_devices_per_core

cores = cpu_devices_per_core()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxret.models.hf_t5 import load_t5  # noqa: E402
from jaxret.models.t5 import T5  # noqa: E402
from jaxret.teachers.t5_teacher import pair_scores  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--passage-length", type=int, default=256)
    p.add_argument("--question-length", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(cores)
    cfg = transformers.T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    n, lp, lq = args.pairs, args.passage_length, args.question_length
    ids = rng.integers(2, 32000, (1, n, lp), dtype=np.int32)
    mask = np.ones_like(ids)
    labels = rng.integers(2, 32000, (1, lq), dtype=np.int32)
    lmask = np.ones_like(labels)
    print(
        f"T5-small shape, {n} pairs, passage {lp}, question {lq}; {jax.device_count()} jax devices"
    )
    print(f"{'dtype':>9} {'torch pairs/s':>14} {'jaxret pairs/s':>15} {'ratio':>6}")
    for dtype in ("float32", "bfloat16"):
        c, params, _ = load_t5(folder, dtype=dtype)
        t5 = T5(c, dtype=jax.numpy.dtype(dtype))
        fn = jax.jit(lambda p, a, b, c_, d: pair_scores(t5, p, a, b, c_, d, "mean", chunk=8))
        ours = best_time(lambda: jax.block_until_ready(fn(params, ids, mask, labels, lmask)))
        tm = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        t_ids = torch.from_numpy(ids[0].astype(np.int64))
        t_lab = torch.from_numpy(np.repeat(labels, n, 0).astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                logits = tm(
                    input_ids=t_ids, attention_mask=torch.ones_like(t_ids), labels=t_lab
                ).logits
                torch.log_softmax(logits.float(), -1).gather(-1, t_lab[..., None]).mean()

        theirs = best_time(run_torch)
        print(f"{dtype:>9} {n / theirs:14.1f} {n / ours:15.1f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
