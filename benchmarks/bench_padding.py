"""Padded [chosen; rejected] batches against padding-free ones (simpo.pack_prompt + simpo.pack_tokens).

Pairs drawn like real preference data: response lengths log-normal, clipped to 10..1500 tokens, chosen
and rejected drawn independently; prompts log-normal, 10..300 tokens. Both layouts run the same
micro-batches (same pairs, same order: no length grouping) of a random float32 Llama through the
log-probs, a weighted sum and backward on one thread; the first micro-batch is a warm-up. Reported:
the padding share of each layout's batches, seconds per micro-batch, pairs/s and response tokens/s
(labelled tokens, the same for both layouts), and the largest difference of their log-probs.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_padding.py                   # tiny shape, ~2 min
    OMP_NUM_THREADS=1 nice python benchmarks/bench_padding.py --shape smollm2   # SmolLM2-135M shape
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
          "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3)}
VOCAB = 2048


def draw_pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    length = lambda mu, lo, hi: int(np.clip(rng.lognormal(mu, 1.0), lo, hi))  # noqa: E731
    pairs = []
    for _ in range(n):
        p, c, r = length(4.0, 10, 300), length(5.0, 10, 1500), length(5.0, 10, 1500)
        prompt, chosen, rejected = (rng.integers(1, VOCAB, k).tolist() for k in (p, c, r))
        pairs.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * p + chosen,
                      "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * p + rejected})
    return pairs


def run(model, logps, batches) -> tuple[float, list[torch.Tensor]]:
    """Seconds per micro-batch (after one warm-up) and the chosen log-probs of each micro-batch."""
    values, start = [], None
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        chosen, rejected = logps(model, batch)
        (chosen - 0.5 * rejected).sum().backward()
        model.zero_grad(set_to_none=True)
        values.append(chosen.detach())
    return (time.perf_counter() - start) / (len(batches) - 1), values


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_lite.data import PairCollator, PackedPairCollator, padding_share
    from simpo_lite.logprobs import concatenated_logps
    from simpo_lite.packed import packed_logps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--batches", type=int, default=6, help="micro-batches (the first is a warm-up)")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="row budget of the padding-free layout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **SHAPES[args.shape]))
    model.train()
    pairs = draw_pairs(args.pairs * args.batches, args.seed)
    groups = [pairs[i:i + args.pairs] for i in range(0, len(pairs), args.pairs)]
    layouts = {"padded": ([PairCollator(0)(g) for g in groups], concatenated_logps),
               f"padding-free (pack_tokens={args.pack_tokens})":
                   ([PackedPairCollator(0, args.pack_tokens)(g) for g in groups], packed_logps)}
    labelled = sum(len(f[f"{s}_labels"]) - f[f"{s}_labels"].count(-100) for g in groups[1:] for f in g
                   for s in ("chosen", "rejected"))
    print(f"{args.shape} Llama, {args.pairs} pairs x {args.batches} micro-batches, 1 thread, float32, sdpa")
    print(f"| layout | padding share | s / micro-batch | pairs/s | response tokens/s |\n|---|---|---|---|---|")
    results = {}
    for name, (batches, logps) in layouts.items():
        seconds, values = run(model, logps, batches)
        results[name] = values
        share = np.mean([padding_share(b) for b in batches])
        print(f"| {name} | {share:.2f} | {seconds:.2f} | {args.pairs / seconds:.2f} | "
              f"{labelled / (seconds * (args.batches - 1)):.0f} |")
    first, second = results.values()
    print(f"largest log-prob difference: {max(float((a - b).abs().max()) for a, b in zip(first, second)):.1e}")


if __name__ == "__main__":
    main()
