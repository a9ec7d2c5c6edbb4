"""`simpo-lite plan --processes N --fsdp`: the per-GPU estimate of N-way FSDP, as simpo_lite.sharding wraps it.

What changes against one GPU, term by term (activations do not: each GPU runs its own micro-batch):

- the 4-bit blocks, embeddings, head and norms, LoRA weights, their optimizer state and gradients are
  sharded: 1/N of each on every GPU;
- bitsandbytes' quantization constants are not parameters, so FSDP does not shard them: whole on each GPU;
- during a step FSDP holds unsharded copies: the root unit (embeddings, output head and final norm:
  what the decoder-layer and LoRA units leave over) for the whole step, since FSDP1 does not reshard the
  root between forward and backward, and two decoder layers' 4-bit blocks and LoRA matrices at a time
  (the one computing and the one backward_prefetch BACKWARD_PRE gathers ahead), plus one layer's
  unsharded LoRA gradients before they are reduce-scattered.
"""

from __future__ import annotations

from dataclasses import replace

from simpo_lite.plan import NF4_BYTES, Arch, Estimate, linear_shapes, lora_params

PREFETCHED_LAYERS = 2  # the layer computing and the one gathered ahead of it


def sharded(est: Estimate, arch: Arch) -> Estimate:
    """`est` (one GPU holding everything) as one of s.fsdp_processes FSDP processes holds it."""
    s = est.setting
    n = s.fsdp_processes
    packed = _packed_bytes(arch, s)
    constants = est.base_weights - packed  # quantization constants (0 without quantization)
    lora_per_layer = lora_params(arch, s) / arch.layers
    gathered = est.unquantized_weights + PREFETCHED_LAYERS * (packed / arch.layers + lora_per_layer * 4)
    return replace(est, base_weights=packed / n + constants, unquantized_weights=est.unquantized_weights / n,
                   lora_weights_and_states=est.lora_weights_and_states / n,
                   lora_grads=est.lora_grads / n + lora_per_layer * 4, fsdp_gathered=gathered)


def _packed_bytes(arch: Arch, s) -> float:
    """The decoder's linear weights as FSDP shards them: the 4-bit blocks, or unquantized weights."""
    per_layer = sum(i * o for i, o in linear_shapes(arch).values())
    return arch.layers * per_layer * (NF4_BYTES if s.quantize else s.compute_bytes)


def sharded_parameter_bytes(est: Estimate, arch: Arch) -> float:
    """What one process's FSDP shards hold (flat parameters only: the 4-bit blocks, the unquantized
    weights, the fp32 LoRA weights, 1/N each); tests/fsdp_on_cpu.py measures it as shard_bytes."""
    s = est.setting
    return (_packed_bytes(arch, s) + est.lora_params * 4) / s.fsdp_processes + est.unquantized_weights
