"""`model.kernels`: Liger-Kernel's fused Triton kernels (RMSNorm, SwiGLU/GeGLU MLP, RoPE) in training with
`liger`; with `none`, simpo_lite.lean_layers' PyTorch RMSNorm and SwiGLU, which keep as little for backward.

Liger patches a loaded model in place, per architecture (`apply_liger_kernel_to_<model_type>`). Its
cross-entropy and fused linear-cross-entropy kernels stay off: simpo-lite never builds the logits
tensor those kernels exist to avoid (logprobs.py computes response log-probs a chunk at a time). Triton
kernels need a CUDA GPU; anywhere else, or without the package, the run is refused before any model is
loaded, in one line, instead of failing inside Triton.
"""

from __future__ import annotations

import importlib.util
import inspect

from simpo_lite.errors import UserError

# The fused layers asked for; each architecture's patch function takes the subset it has.
FUSED = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True,
         "cross_entropy": False, "fused_linear_cross_entropy": False}


def check_kernels(model_cfg, cuda_available: bool | None = None) -> None:
    """Refuse `kernels: liger` where it cannot run: no CUDA device, or liger-kernel not installed."""
    if model_cfg.kernels == "none":
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise UserError("model.kernels: liger needs a CUDA GPU (Liger-Kernel is written in Triton) and this machine "
                        "has none: leave model.kernels at none")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("model.kernels: liger needs the liger-kernel package: pip install liger-kernel "
                        "(or leave model.kernels at none)")


def apply_kernels(model, model_cfg) -> None:
    """Patch `model` (a loaded transformers causal LM, before LoRA) with Liger's fused layers, or, with
    model.kernels none, with simpo_lite.lean_layers' PyTorch ones that keep less for backward."""
    if model_cfg.kernels == "none":
        from simpo_lite.lean_layers import use_lean_layers

        use_lean_layers(model)
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        raise UserError(f"model.kernels: liger has no kernels for {model_type} models (it has: "
                        f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); leave model.kernels at none")
    accepted = inspect.signature(patch).parameters
    patch(model=model, **{name: on for name, on in FUSED.items() if name in accepted})
