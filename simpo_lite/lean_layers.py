"""Gated MLPs and RMSNorms that keep less for backward, with transformers' values and gradients.

What a decoder layer keeps for backward is what `model.uncheckpointed_layers` costs per layer. Two of its
parts keep more than their gradients need:

- the gated MLP, down(silu(gate(x)) * up(x)), keeps gate, silu(gate) and up: three [tokens,
  intermediate] tensors. silu(gate) is cheap to compute again from gate, so SiluMul keeps two.
- RMSNorm casts its input to fp32 and keeps that copy (4 bytes a value where the residual stream is
  bf16). RmsNorm keeps the input as it comes and one fp32 scale per token.

On SmolLM2 with a bf16 residual stream that is 5.4 of the 25 KB per token one kept layer saved
(benchmarks/layer_memory.py). Liger-Kernel's Triton kernels (`model.kernels: liger`) do the same on a
GPU; these are plain PyTorch and run everywhere else. They replace the forward of the norms and MLPs of
the model families whose norm is weight * x / rms(x) and whose MLP is exactly the one above; other
models keep theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# transformers model types whose *RMSNorm and *MLP are Llama's (checked by tests against the originals).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up (not silu(gate)) for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return grad * up * sig * (1 + gate * (1 - sig)), grad * silu


class RmsNorm(torch.autograd.Function):
    """weight * (x / rms(x)) as transformers' LlamaRMSNorm computes it (in fp32, cast back to x's dtype
    before the weight), keeping x and the fp32 scale 1 / rms(x) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_normed = (grad * weight).float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def _mlp_forward(self, x):
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _norm_forward(self, hidden_states):
    return RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


_LEAN_CLASSES: dict[type, type] = {}


def _lean_class(cls: type, forward) -> type:
    """A subclass of cls with `forward`. A subclass rather than an instance attribute: transformers'
    hub-kernel support (kernelize, on every model.train()) resets instance forwards to the class's."""
    if cls not in _LEAN_CLASSES:
        _LEAN_CLASSES[cls] = type(f"Lean{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _LEAN_CLASSES[cls]


def use_lean_layers(model) -> int:
    """Give the RMSNorms and SiLU-gated MLPs of a Llama-family model the forwards above (before LoRA
    wraps the linears: the MLP calls its projections, whatever wraps them). Returns how many modules
    changed; 0 for other model types and on a second call."""
    from transformers.activations import SiLUActivation

    if getattr(model.config, "model_type", None) not in FAMILIES:
        return 0
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls in _LEAN_CLASSES.values():
            continue
        if cls.__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.__class__ = _lean_class(cls, _norm_forward)
            changed += 1
        elif cls.__name__.endswith("MLP") and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
            module.__class__ = _lean_class(cls, _mlp_forward)
            changed += 1
    return changed
