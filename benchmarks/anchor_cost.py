"""What simpo.anchor_weight costs per training step: the demo preset's model and micro-batches, one step's
forward + backward with the anchor off and on, alternating on the same batches in one process.

CPU time of this process (time.process_time), so another job on the shared cores inflates neither side;
the optimizer step is left out (the same with and without the anchor). The adapters are perturbed first
so the KL is not the trivial 0 of step 0 (its cost does not depend on its value).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/anchor_cost.py --batches 6
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2-demo")
    parser.add_argument("--batches", type=int, default=6, help="micro-batches timed with each setting")
    args = parser.parse_args()
    import torch

    from simpo_lite.anchor import shared_prefix_mask
    from simpo_lite.config import resolve
    from simpo_lite.data import build_datasets, make_collator
    from simpo_lite.model import load_model, load_tokenizer
    from simpo_lite.policy import ConcatenatedPolicy, batch_objective

    torch.set_num_threads(1)
    cfg = resolve(preset=args.preset, sets=["simpo.anchor_weight=1"])
    tokenizer = load_tokenizer(cfg.model)
    train = build_datasets(cfg.data, tokenizer, cfg.train.seed).train
    collate = make_collator(tokenizer.pad_token_id, False)
    size = cfg.train.micro_batch_size
    batches = [collate([train[i] for i in range(b * size, (b + 1) * size)]) for b in range(args.batches)]
    model = load_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    policies = {"off": ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens),
                "on": ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens, anchor=True)}
    seconds = {"off": [], "on": []}
    shared, tokens = 0, 0
    for batch in [batches[0]] + batches:  # the first one warms up
        for name, policy in policies.items():
            start = time.process_time()
            loss, metrics = batch_objective(policy, batch, cfg.simpo)
            loss.backward()
            seconds[name].append(time.process_time() - start)
            model.zero_grad(set_to_none=True)
        shared += int(shared_prefix_mask(batch["labels"]).sum())
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    off, on = (statistics.median(seconds[n][1:]) for n in ("off", "on"))
    print(f"{args.preset}: {args.batches} micro-batches of {size} pairs, forward + backward, CPU s (median): "
          f"anchor off {off:.2f}, on {on:.2f} (+{on - off:.2f} s, {on / off - 1:+.0%}); "
          f"shared response tokens {shared / (args.batches + 1):.0f} of {tokens / (args.batches + 1):.0f} "
          f"labelled per micro-batch")


if __name__ == "__main__":
    main()
