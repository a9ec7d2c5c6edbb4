"""LoRA adapters that keep their input once for backward, instead of up to three tensors per adapter.

peft computes an adapter as lora_B(lora_A(dropout(cast(x)))) * scaling. For backward autograd then keeps,
per adapter: its own cast copy of x (fp32 when the residual stream is bf16), the dropout's noise (on the
CPU a full fp32 tensor, not a 1-byte mask) and lora_A's input, the dropped copy. q, k and v read the same
x, so a decoder layer keeps up to three of each. Measured on SmolLM2-135M (4-bit, LoRA r=16 on every
linear, dropout 0.05, CPU, benchmarks/layer_memory.py): one layer with its activations kept saves 74 KB
per token with peft's path and 45 KB with this one (60 and 25 KB with a bf16 residual stream).

Here lora_A is computed by LoraDown, which takes x as it comes (peft's cast is turned off), casts and
drops inside, and saves only x itself, the tensor q, k and v (and gate and up) share, and the seed of
its dropout draw; backward draws the same keep-mask again from that seed and recomputes the dropped
input. Values and gradients are peft's, the dropout draws aside (the seeds come from torch's global
generator, so a seeded or resumed run draws the same masks). Only plain LoRA on linear layers is
changed; DoRA and other variants keep peft's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoraDown(nn.Linear):
    """lora_A with its dropout folded in: same weight (and state-dict key), only its input kept for backward."""

    def __init__(self, linear: nn.Linear, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        # One draw of the CPU generator per call: checkpointing restores its state before it recomputes
        # a layer, so the recomputation draws the same seed, hence the same mask.
        seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
        return _DroppedDown.apply(x, self.weight, seed, p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


class _DroppedDown(torch.autograd.Function):
    """dropout(x) @ weight.T, computed in the autocast dtype when autocast is on, else in weight's."""

    @staticmethod
    def forward(ctx, x, weight, seed, p):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.seed, ctx.p = dtype, seed, p
        with torch.autocast(device, enabled=False):
            return F.linear(_dropped(x, keep_mask(x, seed, p), p, dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        keep = keep_mask(x, ctx.seed, ctx.p)
        grad = grad.to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _dropped(grad @ weight.to(ctx.dtype), keep, ctx.p, ctx.dtype).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = _dropped(x, keep, ctx.p, ctx.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


def keep_mask(x: torch.Tensor, seed: int, p: float) -> torch.Tensor | None:
    """Which elements of x dropout keeps (each with probability 1 - p): the same mask for the same seed."""
    if p == 0:
        return None
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if keep is None else x * keep / (1 - p)


def keep_lora_inputs_once(model) -> int:
    """Swap every plain LoRA adapter's lora_A and dropout for LoraDown; returns how many were swapped.
    Call before the optimizer is built: the parameters stay the same objects either way."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        plain = {name: down for name, down in layer.lora_A.items()
                 if name not in getattr(layer, "lora_variant", {}) and type(down) in (nn.Linear, LoraDown)
                 and down.bias is None}
        if len(plain) != len(layer.lora_A):
            continue  # peft's cast serves every adapter of a layer at once: leave a mixed layer alone
        for name, down in plain.items():
            if type(down) is nn.Linear:
                dropout = layer.lora_dropout[name]
                layer.lora_A[name] = LoraDown(down, dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
                layer.lora_dropout[name] = nn.Identity()
                swapped += 1
        # x reaches LoraDown as it comes; LoraDown casts it without keeping the cast.
        layer.cast_input_dtype_enabled = False
    return swapped
