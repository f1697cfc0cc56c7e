"""Cost of the one-pass analysis on transformers models, as ratios measured in one run.

    python benchmarks/hf_overhead.py --json bench_hf.json
    python benchmarks/hf_overhead.py --device cuda --sequences 4096 --json bench_hf_gpu.json

Offline: the text is the Python standard library's own sources (one line or a few lines
per sequence, up to `--max-length` tokens), the tokenizer a byte-level BPE trained on
them here with `tokenizers`, and both models are built from configs (random weights:
the cost does not depend on them):

  lm_analyze_over_inference   a LLaMA-layout causal LM (`--layers` layers of width
                              `--hidden`): nclayers.analyze over every layer, next-token
                              task (every position a sample, classes the --top-k most
                              frequent next tokens) / plain inference      target <= 1.10
  cls_analyze_over_inference  a BERT-layout sequence classifier of the same size, 4
                              classes: analyze over every layer (mean over real tokens)
                              / plain inference                            target <= 1.05

Both sides of a ratio run the same batches (tokenised, padded and on the device before
timing), under the same autocast (bf16 on CUDA unless --no-amp; none on the CPU), in
eval mode under no_grad. Each variant runs `--repeats` times, interleaved, in
alternating order; the median time counts. The ratios of the fastest runs are printed
too (`*_min`), and with `--profile` the cost of the operations analyze adds, from
torch.profiler (`*_profiled`: 1 + the extra calls of each operator times the mean self
CPU time of that operator and input shapes, over the profiled inference time), which
other work on the machine hardly moves. On a CPU shared with other work, `--clock cpu
--threads 1` times the process's own CPU time on one thread: waiting for a core (and,
with several threads, for the other threads of a parallel region) is the other work's
cost, not ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from nclayers.analysis import analyze
from nclayers.data.text import NextTokenClasses, TextBatches, count_next_tokens, from_texts
from nclayers.models import find_blocks
from nclayers.runtime import autocast
from profiled import profiled_overhead  # benchmarks/profiled.py beside this script


def stdlib_texts(count: int, seed: int = 0) -> list[str]:
    """`count` chunks of 1-6 non-empty source lines of the standard library's modules."""
    folder = Path(os.__file__).parent
    lines: list[str] = []
    for path in sorted(folder.glob("*.py")):
        lines += [ln.strip() for ln in path.read_text(errors="ignore").splitlines() if ln.strip()]
        if len(lines) > 40 * count:
            break
    gen = torch.Generator().manual_seed(seed)
    texts, i = [], 0
    while len(texts) < count and i < len(lines):
        k = int(torch.randint(1, 7, (1,), generator=gen))
        texts.append("\n".join(lines[i : i + k]))
        i += k
    return texts


def bpe_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def models(args, vocab: int, device: torch.device):
    import transformers as T

    common = dict(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, vocab_size=vocab,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = T.LlamaForCausalLM(
        T.LlamaConfig(**common, num_key_value_heads=args.heads, max_position_embeddings=512,
                      use_cache=False)
    )  # fmt: skip
    cls = T.BertForSequenceClassification(
        T.BertConfig(**common, num_labels=4, max_position_embeddings=512)
    )
    return lm.to(device).eval(), cls.to(device).eval()


@torch.no_grad()
def inference(model, batches, amp: bool) -> None:
    for inputs, _ in batches:
        with autocast(inputs["input_ids"].device, amp):
            model(**inputs)


def timed(variants: dict, repeats: int, sync, clock=time.perf_counter) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for r in range(repeats):
        order = list(variants.items())
        if r % 2:  # alternate the order: drift in machine load hits every variant alike
            order.reverse()
        for name, fn in order:
            sync()
            t = clock()
            fn()
            sync()
            times[name].append(clock() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (CPU runs only)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also the profiled cost of the operations analyze adds",
    )
    p.add_argument("--json", help="write the ratios to this JSON file")
    args = p.parse_args()

    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type == "cuda":
        p.error("--clock cpu times CPU runs; use the wall clock on CUDA")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    texts = stdlib_texts(args.sequences)
    tokenizer = bpe_tokenizer(texts, args.vocab)
    data = from_texts(texts, tokenizer, [i % 4 for i in range(len(texts))],
                      max_length=args.max_length)  # fmt: skip
    classes = NextTokenClasses.from_counts(count_next_tokens(data), args.top_k)
    # Batches made once, on the device: both sides of a ratio run exactly these.
    lm_batches = list(TextBatches(data, args.batch_size, device, next_token=classes))
    cls_batches = list(TextBatches(data, args.batch_size, device))
    lm, cls = models(args, data.vocab_size, device)
    lm_blocks, cls_blocks = find_blocks(lm, pool="token"), find_blocks(cls, pool="mean")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = {
        "lm_inference": lambda: inference(lm, lm_batches, amp),
        "lm_analyze": lambda: analyze(lm, lm_batches, args.top_k, lm_blocks, amp=amp,
                                      progress=False, token_classes=classes.tokens),
        "cls_inference": lambda: inference(cls, cls_batches, amp),
        "cls_analyze": lambda: analyze(cls, cls_batches, 4, cls_blocks, amp=amp, progress=False),
    }  # fmt: skip
    times = timed(variants, args.repeats, sync, clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    lm_table = analyze(lm, lm_batches, args.top_k, lm_blocks, amp=amp, progress=False,
                       token_classes=classes.tokens)  # fmt: skip
    tokens = int(data.lengths.sum())
    profiled = {}
    if args.profile:
        for name in ("lm", "cls"):
            profiled[f"{name}_analyze_over_inference_profiled"] = profiled_overhead(
                variants[f"{name}_inference"], variants[f"{name}_analyze"]
            )
    result = {
        "lm_analyze_over_inference": med["lm_analyze"] / med["lm_inference"],
        "cls_analyze_over_inference": med["cls_analyze"] / med["cls_inference"],
        "lm_analyze_over_inference_min": low["lm_analyze"] / low["lm_inference"],
        "cls_analyze_over_inference_min": low["cls_analyze"] / low["cls_inference"],
        **profiled,
        "seconds": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "spread": {k: [min(v), max(v)] for k, v in times.items()},
        "sequences": len(data), "tokens": tokens, "kept_positions": lm_table[0]["n"],
        "max_length": args.max_length, "batch_size": args.batch_size, "batches": len(lm_batches),
        "padded_tokens": sum(int(x["attention_mask"].numel()) for x, _ in lm_batches),
        "vocab": data.vocab_size, "hidden": args.hidden, "layers": args.layers,
        "heads": args.heads, "top_k": args.top_k,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": amp, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "clock": args.clock,
        "torch": torch.__version__,
    }  # fmt: skip
    print(f"{len(data)} sequences ({tokens} tokens, {result['padded_tokens']} with padding) of "
          f"stdlib source, batch {args.batch_size}, {args.layers} layers of width {args.hidden}, "
          f"vocab {data.vocab_size}, top-{args.top_k} next tokens ({result['kept_positions']} "
          f"positions kept), {result['device']}, amp={amp}, {result['threads']} threads, "
          f"{args.clock} clock, median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<14} {v:8.3f} s  {tokens / v:9.0f} tokens/s")
    for name, label, target in (("lm", "causal LM: ", 1.10), ("cls", "classifier:", 1.05)):
        print(f"{label} analyze / inference = {result[f'{name}_analyze_over_inference']:.3f} "
              f"(fastest runs: {result[f'{name}_analyze_over_inference_min']:.3f}"
              + (f", profiled: {profiled[f'{name}_analyze_over_inference_profiled']:.3f}"
                 if profiled else "") + f")   target <= {target}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
