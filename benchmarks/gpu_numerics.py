"""What the CPU tests cannot show, on a CUDA GPU: attention by segments (simpo_lite.segments) and LoRA
inputs kept once (simpo_lite.lora_inputs) give the numbers of the unpacked batch and of peft's path.

    python benchmarks/gpu_numerics.py        # prints one line per check, exits 1 if any is off
    DEVICE=cpu python benchmarks/gpu_numerics.py   # the script itself, checked on a CPU

Random Llama (4 layers, 256 wide, GQA), random pairs of mixed lengths, several pairs a packed row:
- packed vs unpacked chosen/rejected log-probs and LoRA gradients, fp32 and bf16 weights, for each
  kernel: sdpa (SDPA one segment at a time) and, where flash-attn is installed, flash_attention_2
  (flash_attn_varlen_func, bf16 only); without flash-attn a SKIP line says so (REQUIRE_FLASH=1: exit 3);
- LoRA with its inputs kept once against peft's own path, under bf16 autocast as a GPU run trains.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
DEVICE = os.environ.get("DEVICE", "cuda")


def lora_model(dtype, kernel, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation=kernel)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False, target_modules="all-linear"))
    return model.to(DEVICE)


def values_and_grads(model, logps, batch):
    chosen, rejected = logps(model, {k: v.to(DEVICE) for k, v in batch.items()})
    (chosen.float().sum() - 0.5 * rejected.float().sum()).backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return torch.cat([chosen.float(), rejected.float()]).detach(), grads


def report(name, ours, reference, tol) -> bool:
    value_err = (ours[0] - reference[0]).abs().max().item()
    grad_err = ((ours[1] - reference[1]).norm() / reference[1].norm()).item()
    ok = value_err <= tol[0] and grad_err <= tol[1]
    print(f"{'ok ' if ok else 'OFF'} {name}: log-probs max |diff| {value_err:.2e} (<= {tol[0]:g}), "
          f"gradient relative error {grad_err:.2e} (<= {tol[1]:g})", flush=True)
    return ok


def main() -> int:
    from simpo_lite.data.batching import PairCollator
    from simpo_lite.data.packing import PackedPairCollator
    from simpo_lite.logprobs import concatenated_logps
    from simpo_lite.lora_inputs import keep_lora_inputs_once
    from simpo_lite.packed import packed_logps
    from test_packing import random_features

    features = random_features([(30, 200, 90), (5, 12, 300), (120, 40, 41), (8, 8, 3), (60, 300, 150)], seed=4)
    padded, packed = PairCollator(0)(features), PackedPairCollator(0, 1024)(features)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{name}; {len(features)} pairs in {packed['input_ids'].shape[0]} packed row(s)")
    kernels = ["sdpa"]
    try:
        import flash_attn  # noqa: F401
        kernels.append("flash_attention_2")
    except ImportError:
        # PyPI has only flash-attn's sdist, which builds its CUDA extension for far longer than a lent
        # machine's call allows; a wheel built elsewhere (torch 2.11, CUDA 13, cp312) would be needed.
        print("SKIP packed by segments, flash_attention_2 (flash_attn_varlen_func) vs padded SDPA: "
              "flash-attn not installed, so this figure is NOT measured", flush=True)
        if os.environ.get("REQUIRE_FLASH") == "1":
            return 3
    # Noted only (simpo-lite does not use it): torch's own varlen attention, a possible kernel for packed
    # rows without flash-attn; its signature and causal alignment would need checking on this torch.
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        varlen = "present"
    except ImportError:
        varlen = "absent"
    print(f"note: torch {torch.__version__}: torch.nn.attention.varlen.varlen_attn {varlen} "
          "(not used by simpo-lite)", flush=True)
    ok = True
    for kernel in kernels:
        for dtype, tol in ((torch.float32, (1e-4, 1e-3)), (torch.bfloat16, (0.05, 0.05))):
            if kernel == "flash_attention_2" and dtype == torch.float32:
                continue
            model = lora_model(dtype, "sdpa")
            reference = values_and_grads(model, concatenated_logps, padded)
            model.base_model.model.config._attn_implementation = kernel
            ours = values_and_grads(model, packed_logps, packed)
            ok &= report(f"packed by segments, {kernel}, {dtype}", ours, reference, tol)
    peft_path = lora_model(torch.float32, "sdpa")
    kept_once = copy.deepcopy(peft_path)
    keep_lora_inputs_once(kept_once)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        reference = values_and_grads(peft_path, concatenated_logps, padded)
        ours = values_and_grads(kept_once, concatenated_logps, padded)
    ok &= report("LoRA inputs kept once, bf16 autocast", ours, reference, (0.02, 0.02))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
