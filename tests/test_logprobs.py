"""Chunked response log-probs against the naive full-logits computation, in float64.

Every reference here goes through the model's own ``forward`` (so its own logit soft-capping or
scaling), a full log-softmax and a gather: exactly what simpo_lite avoids building.
"""

import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)
from torch.utils._python_dispatch import TorchDispatchMode

from simpo_lite.logprobs import (IGNORE_INDEX, check_logit_head, concatenated_logps, head_logps,
                                 sequence_logps)

VOCAB = 128
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
             initializer_range=0.3)  # peaked distributions: logits of order 1, so a cap of 1 bends them


def tiny(kind: str, tied: bool = False, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tied))
    elif kind == "gemma2":
        # A cap of 1.0 on logits of norm ~1 puts tanh well into its curved part, so a missed cap shows.
        cfg = Gemma2Config(**SIZES, tie_word_embeddings=tied, final_logit_softcapping=1.0,
                           query_pre_attn_scalar=8, sliding_window=16, attn_implementation="eager")
        model = Gemma2ForCausalLM(cfg)
    elif kind == "cohere":
        model = CohereForCausalLM(CohereConfig(**SIZES, tie_word_embeddings=tied, logit_scale=0.25))
    elif kind == "granite":
        model = GraniteForCausalLM(GraniteConfig(**SIZES, tie_word_embeddings=tied, logits_scaling=4.0))
    else:
        raise ValueError(kind)
    return model.to(dtype)


def batch(rows=4, length=11, seed=1):
    """Rows of different total and prompt lengths, right-padded: labels only on each row's response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    lengths = [length, length - 2, length - 5, length][:rows] + [length] * max(0, rows - 4)
    prompts = [3, 5, 2, 1][:rows] + [2] * max(0, rows - 4)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
        ids[r, n:] = 0
    return ids, mask, labels


def naive_logps(model, ids, mask, labels, average=True):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    per_token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (per_token * keep).sum(-1)
    return sums / keep.sum(-1) if average else sums


def grads_of(model, fn, weights):
    """Value, parameter grads and final-hidden-state grads of sum(weights * fn(model))."""
    seen = {}
    norm = model.get_decoder().norm

    def keep_output(module, args, out):
        out.retain_grad()
        seen["hidden"] = out

    handle = norm.register_forward_hook(keep_output)
    try:
        values = fn(model)
        (values * weights).sum().backward()
    finally:
        handle.remove()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return values.detach(), params, seen["hidden"].grad


def close(actual, expected, name=""):
    # Gemma-2 and Cohere norms compute in float32 even in a float64 model, so allow float32 rounding
    # relative to the tensor's scale; any real mistake (a missed cap, a wrong position) is far larger.
    atol = 1e-12 + 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_same(reference, ours):
    ref_values, ref_params, ref_hidden = reference
    values, params, hidden = ours
    close(values, ref_values, "log-probs")
    assert params.keys() == ref_params.keys()
    for name in params:
        close(params[name], ref_params[name], name)
    # simpo_lite never runs the last position (it predicts nothing): its hidden grad must be zero.
    close(hidden, ref_hidden[:, :-1], "final hidden states")
    assert ref_hidden[:, -1].abs().max() == 0


CASES = [("llama", False), ("llama", True), ("gemma2", False), ("gemma2", True),
         ("cohere", True), ("granite", False)]


@pytest.mark.parametrize("kind,tied", CASES)
@pytest.mark.parametrize("head_trainable", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_values_and_grads_match_full_logits(kind, tied, head_trainable, chunk):
    model = tiny(kind, tied)
    model.get_output_embeddings().weight.requires_grad_(head_trainable)
    ids, mask, labels = batch()
    assert (labels[:, 1:] != IGNORE_INDEX).sum() % 7, "chunk 7 must not divide the token count"
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)
    reference = grads_of(model, lambda m: naive_logps(m, ids, mask, labels), weights)
    ours = grads_of(model, lambda m: sequence_logps(m, ids, mask, labels, chunk_tokens=chunk), weights)
    assert_same(reference, ours)


@pytest.mark.parametrize("head_trainable", [True, False])
def test_sum_instead_of_mean(head_trainable):
    model = tiny("gemma2")
    model.lm_head.weight.requires_grad_(head_trainable)
    ids, mask, labels = batch()
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    reference = grads_of(model, lambda m: naive_logps(m, ids, mask, labels, average=False), weights)
    ours = grads_of(model, lambda m: sequence_logps(m, ids, mask, labels, average=False, chunk_tokens=5), weights)
    assert_same(reference, ours)


def test_soft_cap_is_applied():
    """The same Gemma-2 without its cap gives other numbers: the comparison above can fail."""
    model = tiny("gemma2")
    ids, mask, labels = batch()
    with torch.no_grad():
        capped = sequence_logps(model, ids, mask, labels)
        model.config.final_logit_softcapping = None
        uncapped = sequence_logps(model, ids, mask, labels)
    assert (capped - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model = tiny("llama", tied=True)
    ids, mask, labels = batch()
    weights = torch.ones(4, dtype=torch.float64)
    reference = grads_of(model, lambda m: naive_logps(m, ids, mask, labels), weights)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
    model.train()
    ours = grads_of(model, lambda m: sequence_logps(m, ids, mask, labels, chunk_tokens=4), weights)
    assert_same(reference, ours)


def test_lora_wrapped_model_and_head():
    """LoRA on attention and on lm_head itself: the head is then no plain Linear and is checkpointed."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                     init_lora_weights=False))
    model.to(torch.float64)
    assert type(model.get_base_model().get_output_embeddings()) is not torch.nn.Linear
    ids, mask, labels = batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    reference = grads_of(model, lambda m: naive_logps(m, ids, mask, labels), weights)
    ours = grads_of(model, lambda m: sequence_logps(m, ids, mask, labels, chunk_tokens=3), weights)
    assert any("lm_head.lora" in n for n in ours[1])
    assert_same(reference, ours)


def test_float32_model_gives_float32_close_to_float64():
    model = tiny("gemma2", dtype=torch.float32)
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = sequence_logps(model, ids, mask, labels, chunk_tokens=5)
        reference = naive_logps(model.double(), ids, mask, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor, in elements, of shape [..., tokens, vocab] (weight-shaped ones aside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB \
                    and t.shape[:-1] != (SIZES["hidden_size"],):  # a transposed head weight or its grad
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("head_trainable", [True, False])
def test_never_builds_full_logits(head_trainable):
    model = tiny("llama")  # untied, so the head weight is [vocab, hidden] and not counted
    model.lm_head.weight.requires_grad_(head_trainable)
    ids, mask, labels = batch()
    with _LargestVocabTensor() as naive:
        naive_logps(model, ids, mask, labels).sum().backward()
    assert naive.largest >= ids.shape[0] * (ids.shape[1] - 1) * VOCAB  # the detector sees full logits
    with _LargestVocabTensor() as ours:
        sequence_logps(model, ids, mask, labels, chunk_tokens=4).sum().backward()
    assert 0 < ours.largest <= 4 * VOCAB


def test_concatenated_logps_splits_chosen_and_rejected():
    model = tiny("llama", tied=True)
    ids, mask, labels = batch()
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                              chunk_tokens=3)
        every = naive_logps(model, ids, mask, labels)
    torch.testing.assert_close(chosen, every[:2], atol=1e-10, rtol=0)
    torch.testing.assert_close(rejected, every[2:], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="2 x pairs"):
        concatenated_logps(model, {"input_ids": ids[:3], "attention_mask": mask[:3], "labels": labels[:3]})


def test_row_without_labels_is_an_error():
    model = tiny("llama")
    ids, mask, labels = batch()
    labels[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        sequence_logps(model, ids, mask, labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_logps(model, torch.zeros(2, 32, dtype=torch.float64), torch.zeros(2, dtype=torch.long), 0)


class _DoubledLogits(LlamaForCausalLM):
    """A model with a logit transform simpo_lite knows nothing about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere", "granite"])
def test_check_logit_head_accepts_known_models(kind):
    ids, _, _ = batch()
    assert check_logit_head(tiny(kind, dtype=torch.float32), ids) < 1e-4


def test_check_logit_head_rejects_unknown_transform():
    torch.manual_seed(0)
    model = _DoubledLogits(LlamaConfig(**SIZES))
    ids, _, _ = batch()
    with pytest.raises(ValueError, match="transforms its logits"):
        check_logit_head(model, ids, atol=1e-3)


def test_training_step_on_4bit_lora_model_moves_only_the_adapters(tmp_path):
    """bitsandbytes NF4 (it runs on the CPU) + PEFT LoRA: two SimPO steps change every LoRA matrix
    (B first; A once B is non-zero) and leave every base weight and quantization constant as it was."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from simpo_lite.config import SimpoConfig
    from simpo_lite.loss import simpo_objective

    tiny("llama", tied=True, dtype=torch.float32).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    assert "Linear4bit" in type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    lora_before = {n: p.detach().clone() for n, p in lora.items()}

    ids, mask, labels = batch()
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    for _ in range(2):
        chosen, rejected = concatenated_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                              chunk_tokens=5)
        loss, _ = simpo_objective(chosen, rejected, SimpoConfig(beta=2.0, gamma_beta_ratio=0.5))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    unchanged = [n for n, p in lora.items() if torch.equal(p.detach(), lora_before[n])]
    assert not unchanged, f"LoRA weights that did not move: {unchanged}"
    base_after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    moved = [k for k in base_before if not torch.equal(base_after[k], base_before[k])]
    assert not moved, f"base weights changed: {moved}"
