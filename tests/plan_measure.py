"""Measure the peak memory of one real SimPO training step on the CPU, to check simpo_lite.plan.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python tests/plan_measure.py --setting 4,256,8,1024
    python tests/plan_measure.py --device cuda --setting 4,256,8,1024      # on a GPU: torch's allocator peak

The config is the smollm2-demo preset with the setting's pairs, lengths and log-prob chunk, torch AdamW and
any --set: on a CPU with AVX512-BF16 or AMX that is bf16 compute and residual stream, and no gradient
checkpointing (the preset turns it off). With --set model.gradient_checkpointing=true also set
model.uncheckpointed_layers: left at auto, loading fits it to this machine's memory while the plan counts 0.

The 4-bit LoRA model, its optimizer and one concatenated [chosen; rejected] batch go through two full
steps (forward, backward, optimizer step); the second is measured, so the optimizer state already
exists, as in every step of a run but the first. The process must start with the glibc settings above:
every allocation of 64 KiB or more then gets its own mmap and is unmapped when freed, so the resident
set follows live tensor memory instead of keeping freed blocks.

measured peak = bytes of the tensors alive between steps (weights, quantization constants, adapters,
optimizer state: counted exactly) + the rise of the resident set's high-water mark during the step
(gradients, activations, log-prob chunks and every temporary buffer, whoever allocates it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM (the resident set's high-water mark) to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def live_tensor_bytes(model, optimizer) -> int:
    """Bytes of distinct storages held by the model (parameters, buffers, 4-bit quantization state) and optimizer."""
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # double quantization nests a second state
            for value in vars(state).values():
                add(value)
            state = getattr(state, "state2", None)
    for per_param in optimizer.state.values():
        for value in per_param.values():
            add(value)
    return sum(seen.values())


def _batch(rows: int, seq_len: int, prompt_len: int, vocab: int) -> dict:
    import torch

    input_ids = torch.randint(0, vocab, (rows, seq_len))
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100  # the prompt carries no labels, the rest of every row is response
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


EXTRA_SETS: list[str] = []  # --set section.key=value, applied to every measured setting


def _config(micro_batch: int, seq_len: int, prompt_len: int, chunk_tokens: int):
    from simpo_lite.config import resolve

    # torch AdamW everywhere: bitsandbytes' paged 8-bit state lives in CUDA managed memory, which
    # torch's allocator statistics do not see.
    return resolve("smollm2-demo", sets=[f"train.micro_batch_size={micro_batch}", f"data.max_length={seq_len}",
                                         f"data.max_prompt_length={min(prompt_len, seq_len - 1)}",
                                         f"simpo.logp_chunk_tokens={chunk_tokens}", "train.optimizer=adamw",
                                         *EXTRA_SETS])


class _CudaMeter:
    """The same two numbers on a GPU, from torch's allocator (live tensors only, no CUDA context)."""

    def static(self, model, optimizer) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def start(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()

    def rise(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.before


class _CpuMeter:
    def static(self, model, optimizer) -> int:
        return live_tensor_bytes(model, optimizer)

    def start(self) -> None:
        self.before = rss_bytes()
        reset_peak_rss()

    def rise(self) -> int:
        return peak_rss_bytes() - self.before


def measure(settings: list[tuple[int, int, int, int]], threads: int = 2, device: str = "cpu") -> list[dict]:
    """One measured step per (micro_batch, seq_len, prompt_len, chunk_tokens), on one loaded model.

    device 'cuda' runs the step under bf16 autocast, as the trainer's accelerate mixed precision does.
    """
    import contextlib

    import torch

    from simpo_lite.model import load_model
    from simpo_lite.policy import ConcatenatedPolicy, batch_objective
    from simpo_lite.optim import build_optimizer
    from simpo_lite.plan import plan_summary

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(*settings[0])
    model = load_model(cfg)
    policy = ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
    policy.train()  # as the trainer does: checkpointing and dropout are only active in training mode

    meter = _CudaMeter() if device == "cuda" else _CpuMeter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step(batch: dict) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss, _ = batch_objective(policy, batch, cfg.simpo)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # A tiny warm-up step creates the optimizer state and every lazily allocated buffer and thread pool.
    step(_batch(2, 16, 4, model.config.vocab_size))
    results = []
    for micro_batch, seq_len, prompt_len, chunk_tokens in settings:
        policy.chunk_tokens = chunk_tokens
        batch = _batch(2 * micro_batch, seq_len, prompt_len, model.config.vocab_size)
        gc.collect()
        static = meter.static(model, optimizer)
        meter.start()
        loss = step(batch)
        rise = meter.rise()
        planned = plan_summary(_config(micro_batch, seq_len, prompt_len, chunk_tokens), device=device)
        results.append({"micro_batch": micro_batch, "seq_len": seq_len, "prompt_len": prompt_len,
                        "chunk_tokens": chunk_tokens, "loss": loss, "static_tensor_bytes": static,
                        "step_rise_bytes": rise, "measured_peak_bytes": static + rise, **planned})
    return results


def run_in_subprocess(settings: list[tuple[int, int, int, int]], sets: tuple[str, ...] = ()) -> list[dict]:
    """Measure in a fresh interpreter started with the glibc settings (they only apply at startup)."""
    import subprocess

    env = {**os.environ, **MALLOC_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, os.path.abspath(__file__), "--json"]
    for setting in settings:
        args += ["--setting", ",".join(map(str, setting))]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", metavar="PAIRS,SEQ_LEN,PROMPT_LEN,CHUNK",
                        help="a micro-batch to measure (repeatable); default 4,256,8,1024 (4 pairs x 256 tokens)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for every setting, e.g. model.gradient_checkpointing=true (off in the demo preset)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    EXTRA_SETS.extend(args.set)
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        print("warning: start with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
              + " or freed memory stays resident", file=sys.stderr)
    import warnings

    warnings.filterwarnings("ignore")
    settings = [tuple(int(x) for x in s.split(",")) for s in (args.setting or ["4,256,8,1024"])]
    results = measure(settings, device=args.device)
    if args.json:
        print(json.dumps(results))
        return
    mib = 2**20
    for r in results:
        print(f"{r['micro_batch']} pairs x {r['seq_len']} tokens (prompt {r['prompt_len']}), "
              f"log-prob chunk {r['chunk_tokens']}, loss {r['loss']:.4f}")
        print(f"  static tensors  measured {r['static_tensor_bytes'] / mib:7.1f} MiB   planned {r['persistent'] / mib:7.1f} MiB")
        print(f"  step            measured {r['step_rise_bytes'] / mib:7.1f} MiB   planned {r['step'] / mib:7.1f} MiB "
              f"(forward end {r['forward_phase'] / mib:.1f}, backward {r['backward_phase'] / mib:.1f})")
        print(f"  peak            measured {r['measured_peak_bytes'] / mib:7.1f} MiB   planned {r['tensors'] / mib:7.1f} MiB "
              f"(x{r['tensors'] / r['measured_peak_bytes']:.2f})")


if __name__ == "__main__":
    main()
