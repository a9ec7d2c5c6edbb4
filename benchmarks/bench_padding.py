"""Padded [chosen; rejected] batches against padding-free ones (simpo.pack_prompt + simpo.pack_tokens).

Pairs drawn like real preference data: response lengths log-normal, clipped to 10..1500 tokens, chosen
and rejected drawn independently; prompts log-normal, 10..300 tokens. Each layout runs all the pairs
through a random float32 Llama (log-probs, a weighted sum, backward) on torch's threads, in its own
micro-batches: padded ones of --pairs pairs in drawing order, padded ones grouped by length as a run
with data.group_by_length does, and the padding-free micro-batches a run with simpo.pack_tokens
trains on (token_budget_batches: one row of up to --pack-tokens tokens). Each layout first runs its
first micro-batch once, untimed (a warm-up). Reported: micro-batches, padding share, response tokens/s
(labelled tokens per second), and the largest difference of any pair's log-prob between layouts.

    OMP_NUM_THREADS=1 python benchmarks/bench_padding.py --pack-tokens 1024      # tiny shape, 15 s
    OMP_NUM_THREADS=2 python benchmarks/bench_padding.py --shape smollm2 --pairs 2 --batches 4 \
        --pack-tokens 2048                                                        # SmolLM2-135M shape, 6 min
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


def labelled(pair: dict) -> int:
    return sum(len(pair[f"{s}_labels"]) - pair[f"{s}_labels"].count(-100) for s in ("chosen", "rejected"))


def run(model, logps, collate, groups, pairs) -> tuple[float, int, dict[int, float]]:
    """(seconds, response tokens) of all the micro-batches, after one untimed warm-up on the first, and
    each pair's chosen log-prob by its index."""
    values, seconds, tokens = {}, 0.0, 0
    for i, group in enumerate([groups[0]] + groups):
        batch = collate([pairs[j] for j in group])
        start = time.perf_counter()
        chosen, rejected = logps(model, batch)
        (chosen - 0.5 * rejected).sum().backward()
        model.zero_grad(set_to_none=True)
        if i:
            seconds += time.perf_counter() - start
            tokens += sum(labelled(pairs[j]) for j in group)
        values.update(zip(group, chosen.detach().tolist()))
    return seconds, tokens, values


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_lite.data import PairCollator, PackedPairCollator, batch_indices, padding_share
    from simpo_lite.data.packing import token_budget_batches
    from simpo_lite.logprobs import concatenated_logps
    from simpo_lite.packed import packed_logps
    from simpo_lite.run_setup import row_lengths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per padded micro-batch")
    parser.add_argument("--batches", type=int, default=6, help="padded micro-batches' worth of pairs to draw")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="row budget of the padding-free layout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **SHAPES[args.shape]))
    model.train()
    pairs = draw_pairs(args.pairs * args.batches, args.seed)
    columns = {"chosen_input_ids": [p["chosen_input_ids"] for p in pairs],
               "rejected_input_ids": [p["rejected_input_ids"] for p in pairs],
               "prompt_length": [p["chosen_labels"].count(-100) for p in pairs]}
    padded_lengths, packed_lengths = row_lengths(columns, False), row_lengths(columns, True)
    in_order = [list(range(i, i + args.pairs)) for i in range(0, len(pairs), args.pairs)]
    layouts = {
        f"padded, {args.pairs} pairs a micro-batch": (PairCollator(0), concatenated_logps, in_order),
        f"padded, {args.pairs} pairs, length-grouped (data.group_by_length)": (
            PairCollator(0), concatenated_logps, batch_indices(padded_lengths, args.pairs, seed=args.seed)),
        f"padding-free, 1 row of up to {args.pack_tokens} tokens (simpo.pack_tokens)": (
            PackedPairCollator(0, args.pack_tokens), packed_logps,
            token_budget_batches(packed_lengths, 1, args.pack_tokens, seed=args.seed)),
    }
    print(f"{args.shape} Llama, {len(pairs)} pairs, {torch.get_num_threads()} thread(s), float32, sdpa, after one "
          f"untimed micro-batch per layout")
    print("| layout | micro-batches | padding share | response tokens/s |\n|---|---|---|---|")
    results, base = {}, None
    for name, (collate, logps, groups) in layouts.items():
        seconds, tokens, values = run(model, logps, collate, groups, pairs)
        results[name] = values
        share = np.mean([padding_share(collate([pairs[j] for j in g])) for g in groups])
        rate = tokens / seconds
        base = base or rate
        print(f"| {name} | {len(groups)} | {share:.2f} | {rate:,.0f} ({rate / base:.1f}x) |")
    first = next(iter(results.values()))
    print(f"largest log-prob difference between layouts: "
          f"{max(abs(v[i] - first[i]) for v in results.values() for i in first):.1e}")


if __name__ == "__main__":
    main()
