"""A few simpo-lite steps, unpacked and with simpo.pack_prompt, on bench_memory.py's model and pairs.

    PYTHONPATH=. python benchmarks/pack_prompt_steps.py --length 400 --steps 4

One process, one thread, the two runs one after the other (the first step of each is a warm-up).
CPU seconds are process time; the step peak is RSS above the memory before the step (malloc left at
its defaults, so a rough figure: bench_memory.py's memory runs tune malloc for that).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench_memory import make_pairs, quantized_folder, run_simpo_lite, simpo_lite_batch, simpo_lite_packed_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=400)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    folder = quantized_folder("cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = make_pairs(tokenizer, args.length)
    shapes = {False: simpo_lite_batch(tokenizer, data, "cpu"), True: simpo_lite_packed_batch(tokenizer, data, "cpu")}
    results = {}
    for pack in (False, True):
        results[pack] = run_simpo_lite(folder, data, args.steps, "cpu", args.chunk_tokens, pack_prompt=pack)
        r, batch = results[pack], shapes[pack]
        print(f"{'packed  ' if pack else 'unpacked'} batch {list(batch['input_ids'].shape)} "
              f"({int(batch['attention_mask'].sum())} real tokens): "
              f"CPU s/step {[round(s, 2) for s in r['cpu_seconds']]} median {statistics.median(r['cpu_seconds']):.2f}, "
              f"wall median {statistics.median(r['seconds']):.2f}, step peak {r['peak_bytes'] / 2**20:.0f} MiB, "
              f"first loss {r['first_loss']:.6f}, load average {os.getloadavg()[0]:.1f}", flush=True)
    ratio = statistics.median(results[True]["cpu_seconds"]) / statistics.median(results[False]["cpu_seconds"])
    print(f"packed / unpacked CPU seconds per step: {ratio:.2f}; first-loss difference "
          f"{abs(results[True]['first_loss'] - results[False]['first_loss']):.2e}")


if __name__ == "__main__":
    main()
