"""Where one CPU training step's time goes: bench_memory.py's simpo-lite step under torch.profiler.

The same step as the side-by-side bench (SmolLM2-135M in 4-bit NF4, LoRA r=16 on every linear layer,
non-reentrant gradient checkpointing, 2 pairs of --length tokens, AdamW), one warm-up step, then
--steps profiled ones. Each operator's own time (self CPU time, so nothing is counted twice) goes to
the first bucket whose rule matches, by the labelled region it ran in (the output head's log-probs, the
optimizer) or else by its name (4-bit dequantization, matrix products, attention, ...); operator times are the
profiler's durations, so their shares hold even when another job slows them all. Recomputation has no
operator of its own under non-reentrant checkpointing: it is measured as the difference in CPU time
to the same step with every layer's activations kept (a second run).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --length 380
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_memory  # noqa: E402  (the bench's model, data and step, so both measure the same thing)

# By operator name, in order; the first match wins.
NAME_BUCKETS = [
    ("4-bit dequantization", re.compile(r"dequant|bitsandbytes|bnb", re.I)),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|_efficient_attention|softmax")),
    ("matrix products", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$")),
    ("copies and casts", re.compile(r"^aten::(copy_|to|_to_copy|clone|contiguous|cat|index|index_select|"
                                    r"embedding|embedding_dense_backward|gather|scatter.*|_unsafe_view)$")),
]
REGION_BUCKETS = {"simpo-lite: output head log-probs": "output head log-probs (chunked)",
                  "simpo-lite: optimizer": "AdamW step + clipping"}


def bucket_of(event) -> str:
    parent = event
    while parent is not None:
        if parent.name in REGION_BUCKETS:
            return REGION_BUCKETS[parent.name]
        parent = parent.cpu_parent
    return next((name for name, rule in NAME_BUCKETS if rule.search(event.name)), "elementwise and other")


def labelled(function, region: str):
    import torch

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(region):
            return function(*args, **kwargs)
    wrapper.labelled = True
    return wrapper


def profiled_steps(args, checkpointing: bool) -> tuple[float, dict[str, float]]:
    """(CPU seconds of this process per profiled step, operator seconds per step by bucket)."""
    import simpo_lite.logprobs as logprobs
    import simpo_lite.packed as packed
    import torch
    from transformers import AutoTokenizer

    from simpo_lite.config import SimpoConfig
    from simpo_lite.policy import ConcatenatedPolicy, batch_objective

    if not hasattr(logprobs.head_logps, "labelled"):
        logprobs.head_logps = packed.head_logps = labelled(logprobs.head_logps, "simpo-lite: output head log-probs")
    folder = bench_memory.quantized_folder("cpu")
    data = bench_memory.make_pairs(AutoTokenizer.from_pretrained(folder), args.length)
    options = argparse.Namespace(frozen_compute=False, uncheckpointed_layers=0 if checkpointing else 10_000)
    model, params, optimizer, batch, _ = bench_memory._lora_model(folder, data, "cpu", options)
    cfg = SimpoConfig(beta=bench_memory.BETA, gamma_beta_ratio=bench_memory.GAMMA_BETA_RATIO)
    policy = ConcatenatedPolicy(model, cfg.logp_chunk_tokens, False)

    def step():
        batch_objective(policy, batch, cfg)[0].backward()
        with torch.profiler.record_function("simpo-lite: optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.process_time()  # CPU time: what another job on the cores does not inflate
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    cpu = (time.process_time() - start) / args.steps
    buckets: dict[str, float] = defaultdict(float)
    for event in prof.events():
        buckets[bucket_of(event)] += event.self_cpu_time_total / 1e6 / args.steps
    return cpu, dict(buckets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=380, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cpu, buckets = profiled_steps(args, checkpointing=True)
    kept_cpu, _ = profiled_steps(args, checkpointing=False)
    total = sum(buckets.values())
    print(f"| part of one step (2 pairs x {args.length} tokens, {args.threads} thread) | s per step | share |")
    print("|---|---|---|")
    for name, seconds in sorted(buckets.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} |")
    print(f"| all operators (profiled) | {total:.3f} | 100% |")
    print(f"\nCPU seconds per profiled step: {cpu:.2f} with gradient checkpointing, {kept_cpu:.2f} with every "
          f"layer's activations kept: recomputation costs {cpu - kept_cpu:.2f} s ({(cpu - kept_cpu) / cpu:.0%})")


if __name__ == "__main__":
    main()
