"""LoraDown: the same LoRA values and gradients as peft's path, with each adapter's input kept once."""

import copy

import torch

from simpo_lite.data.batching import PairCollator
from simpo_lite.logprobs import concatenated_logps
from simpo_lite.lora_inputs import LoraDown, _DroppedDown, keep_lora_inputs_once, keep_mask
from test_logprobs import tiny
from test_packing import SHAPES, WEIGHTS, assert_same, random_features, values_and_grads

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dropout=0.0, dtype=torch.float64, **extra):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama", dtype=dtype), LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout,
                                                                  init_lora_weights=False,
                                                                  target_modules=ALL_LINEAR, **extra))
    return model.to(dtype)


def test_values_and_grads_match_peft_without_dropout():
    peft_model = lora_model()
    ours = copy.deepcopy(peft_model)
    assert keep_lora_inputs_once(ours) == 2 * len(ALL_LINEAR)  # two layers
    assert keep_lora_inputs_once(ours) == 0  # idempotent
    batch = PairCollator(0)(random_features(SHAPES))
    logps = lambda m, b: concatenated_logps(m, b, chunk_tokens=5)  # noqa: E731
    assert_same(values_and_grads(ours, logps, batch, WEIGHTS), values_and_grads(peft_model, logps, batch, WEIGHTS))
    # The state dict (what adapters are saved and resumed as) keeps its keys.
    assert ours.state_dict().keys() == peft_model.state_dict().keys()


def test_function_is_dropout_then_linear():
    """Values and gradients of dropout(x) @ w.T with the keep-mask of a seed, checked numerically in
    float64; backward draws that same mask again."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    keep = keep_mask(x, seed=123, p=0.3)
    assert torch.equal(keep, keep_mask(x, seed=123, p=0.3)) and not torch.equal(keep, keep_mask(x, seed=124, p=0.3))
    expected = torch.nn.functional.linear(x * keep / 0.7, w)
    torch.testing.assert_close(_DroppedDown.apply(x, w, 123, 0.3), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: _DroppedDown.apply(x, w, 123, 0.3), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: _DroppedDown.apply(x, w, 0, 0.0), (x, w))


def test_checkpointing_recomputes_the_same_mask():
    """A checkpointed layer runs its forward again in backward: the gradient must be that of the first
    forward's draw, as with peft's dropout under checkpointing."""
    from torch.utils.checkpoint import checkpoint

    down = LoraDown(torch.nn.Linear(6, 3, bias=False).double(), dropout=0.5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    checkpoint(down, x, use_reentrant=False).sum().backward()
    recomputed = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    down(x).sum().backward()
    torch.testing.assert_close(recomputed, x.grad, rtol=0, atol=0)


def test_dropout_draws_like_peft():
    """In training a share p of the inputs is dropped (and the rest scaled); in eval mode none."""
    down = LoraDown(torch.nn.Linear(4000, 1, bias=False), dropout=0.25)
    torch.nn.init.ones_(down.weight)
    x = torch.ones(8, 4000)
    kept = down(x)[:, 0] * 0.75  # the sum of the kept ones
    assert ((kept / 4000 - 0.75).abs() < 0.03).all()
    torch.manual_seed(7)
    first = down(x)
    torch.manual_seed(7)
    assert torch.equal(down(x), first)  # the seed decides the draw, as for a resumed run
    assert torch.equal(down.eval()(x), torch.full((8, 1), 4000.0))


def test_bf16_input_keeps_its_dtype_and_is_kept_once():
    """A bf16 residual stream with fp32 adapters: no fp32 copy of x is kept, one bf16 x for q, k and v."""
    model = lora_model(dropout=0.1, dtype=torch.float32)
    keep_lora_inputs_once(model)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 7, attn.q_proj.in_features, dtype=torch.bfloat16, requires_grad=True)
    attn.q_proj.base_layer.to(torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attn.q_proj(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and attn.q_proj.lora_A["default"].weight.grad.dtype == torch.float32
    inputs = [t for t in saved if t.shape == x.shape]
    assert inputs and {t.dtype for t in inputs} == {torch.bfloat16}  # x itself, no cast, dropped copy or mask


def test_a_layer_keeps_less_for_backward():
    """Saved-for-backward bytes of a forward (distinct storages), fp32 and dropout 0.1: peft keeps a
    noise tensor and a dropped copy per adapter; LoraDown keeps x once."""
    def saved_bytes(model):
        storages = {}
        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        batch = PairCollator(0)(random_features(SHAPES))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            concatenated_logps(model, batch)
        return sum(storages.values())

    peft_model = lora_model(dropout=0.1, dtype=torch.float32).train()
    ours = copy.deepcopy(peft_model)
    keep_lora_inputs_once(ours)
    assert saved_bytes(ours) < 0.75 * saved_bytes(peft_model)


def test_variants_and_disabled_adapters_keep_peft_path():
    dora = lora_model(use_dora=True)
    assert keep_lora_inputs_once(dora) == 0
    model = lora_model()
    keep_lora_inputs_once(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(tiny("llama")(input_ids=ids).logits, base, rtol=0, atol=0)  # the same base weights
        assert not torch.allclose(model(input_ids=ids).logits, base)
