"""lean_layers: transformers' RMSNorm and gated-MLP values and gradients, with less kept for backward."""

import copy

import pytest
import torch

from simpo_lite.data.batching import PairCollator
from simpo_lite.lean_layers import RmsNorm, SiluMul, use_lean_layers
from simpo_lite.logprobs import concatenated_logps
from test_logprobs import SIZES, tiny
from test_packing import SHAPES, WEIGHTS, assert_same, random_features, values_and_grads


def family_model(kind: str):
    import transformers

    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    torch.manual_seed(0)
    extra = {"sliding_window": None} if kind != "llama" else {}
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**SIZES, **extra))
    return model.to(torch.float64)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_values_and_grads_match_transformers(kind):
    """Every parameter trainable (norm weights and all), float64: the same log-probs and gradients."""
    reference_model = family_model(kind)
    ours = copy.deepcopy(reference_model)
    layers = SIZES["num_hidden_layers"]
    norms = (2 + (2 if kind == "qwen3" else 0)) * layers + 1  # qwen3 also normalises q and k
    assert use_lean_layers(ours) == norms + layers
    assert use_lean_layers(ours) == 0  # once
    ours.train()  # transformers' kernelize on train() must not undo it
    batch = PairCollator(0)(random_features(SHAPES))
    logps = lambda m, b: concatenated_logps(m, b, chunk_tokens=5)  # noqa: E731
    assert_same(values_and_grads(ours, logps, batch, WEIGHTS), values_and_grads(reference_model, logps, batch, WEIGHTS))


def test_functions_by_gradcheck():
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))



def test_rms_norm_is_transformers_formula():
    """RMSNorm computes in fp32 whatever its input (as transformers' does), so it is checked against
    autograd through transformers' own formula rather than by float64 finite differences."""
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(2, 3, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 8, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(8, generator=g).to(dtype).requires_grad_()
        ours = RmsNorm.apply(x, weight, 1e-6)
        ours_grads = torch.autograd.grad(ours, (x, weight), grad.to(dtype))
        reference = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        reference_grads = torch.autograd.grad(reference, (x, weight), grad.to(dtype))
        assert torch.equal(ours, reference)
        for a, b in zip(ours_grads, reference_grads):
            # bf16: the two orders of the same fp32 sums can round apart by a bf16 step near zero.
            fp32 = dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5 if fp32 else 2e-2, atol=1e-5 if fp32 else 1e-2)


def test_a_bf16_norm_keeps_its_input_not_an_fp32_copy():
    model = tiny("llama", dtype=torch.bfloat16)
    use_lean_layers(model)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 7, SIZES["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    assert [(t.dtype, tuple(t.shape)) for t in saved if t.dim() == 3] == [(torch.bfloat16, (2, 7, 32)),
                                                                           (torch.float32, (2, 7, 1))]


def test_other_families_keep_their_layers():
    assert use_lean_layers(tiny("gemma2")) == 0


@pytest.mark.e2e
def test_a_loaded_model_keeps_them_through_train():
    """from_pretrained and every model.train() run transformers' kernelize where the kernels package is
    installed, which resets instance forwards: the lean classes must survive it."""
    from simpo_lite.config import Config, LoraConfig, ModelConfig
    from simpo_lite.logprobs import causal_lm
    from simpo_lite.model import load_model

    model = load_model(Config(model=ModelConfig(gradient_checkpointing=True, uncheckpointed_layers=0),
                              lora=LoraConfig(r=4)))
    model.train()
    model.eval()
    model.train()
    lm = causal_lm(model)
    assert type(lm.model.norm).__name__ == "LeanLlamaRMSNorm"
    assert all(type(layer.mlp).__name__ == "LeanLlamaMLP" for layer in lm.model.layers)
