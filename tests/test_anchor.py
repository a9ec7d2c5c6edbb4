"""simpo.anchor_weight: the shared-prefix mask by hand, and the chunked KL(base || policy) against a plain
full-logits reference in float64 (the model's own forward, adapters off for the base)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from simpo_lite.anchor import base_kl, shared_prefix_logps, shared_prefix_mask
from simpo_lite.config import SimpoConfig, build_config
from simpo_lite.errors import ConfigError, UserError
from simpo_lite.logprobs import IGNORE_INDEX, concatenated_logps
from simpo_lite.policy import ConcatenatedPolicy, batch_objective, evaluate_dataset
from test_logprobs import VOCAB, close, tiny

X = IGNORE_INDEX


def test_shared_prefix_mask_by_hand():
    # Targets are labels[:, 1:]; column 0 of labels never is a target.
    labels = torch.tensor([
        # pair 0: responses 5 6 7 8 / 5 6 9 -> share 5 6
        [X, X, 5, 6, 7, 8],
        # pair 1: responses 4 / 3 4 -> differ at once, share nothing
        [X, X, X, 4, X, X],
        # pair 2: rejected 7 7 is a prefix of chosen 7 7 2 -> share 7 7 (padding never matches)
        [X, 7, 7, 2, X, X],
        [X, X, 5, 6, 9, X],
        [X, X, 3, 4, X, X],
        # rejected starts one column later (a longer prompt): compared from each response's start
        [X, X, 7, 7, X, X],
    ])
    expected = torch.tensor([
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(shared_prefix_mask(labels), expected)


def pairs_batch(seed=1, length=12):
    """3 pairs, right-padded: pair 0 shares 4 response tokens, pair 1 shares 2, pair 2 shares none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (6, length), generator=g)
    prompt = [3, 2, 4]
    shared = [4, 2, 0]
    ends = [length, length - 3, length - 1, length - 2, length, length - 4]
    for p in range(3):
        cut = prompt[p] + shared[p]
        ids[p + 3, :cut] = ids[p, :cut]
        ids[p + 3, cut] = (ids[p, cut] % (VOCAB - 1)) + 1  # the first response token after the prefix differs
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, X)
    for r in range(6):
        mask[r, :ends[r]] = 1
        labels[r, prompt[r % 3]:ends[r]] = ids[r, prompt[r % 3]:ends[r]]
        ids[r, ends[r]:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora(model, perturbed: bool, head: bool = False):
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if head else [])
    # init_lora_weights=False: B != 0, so the policy differs from its base.
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
                                            init_lora_weights=not perturbed))


def reference_kl(model, batch):
    """KL(base || policy) summed over the shared positions, from full [rows, length, vocab] logits."""
    shared = shared_prefix_mask(batch["labels"])
    pairs = shared.shape[0]
    ids, mask = batch["input_ids"][:pairs], batch["attention_mask"][:pairs]
    policy = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double().log_softmax(-1)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double().log_softmax(-1)
    return (base.exp() * (base - policy)).sum(-1)[shared].sum(), shared.sum()


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_kl_and_its_gradient_are_zero_at_init():
    model = lora(tiny("llama"), perturbed=False)  # LoRA B = 0: policy == base
    kl_sum, tokens = shared_prefix_logps(model, pairs_batch(), chunk_tokens=3)["anchor"]
    assert tokens.item() == 6
    assert abs(kl_sum.item()) < 1e-12
    kl_sum.backward()
    grads = lora_grads(model)
    assert grads and max(g.abs().max().item() for g in grads.values()) < 1e-12


@pytest.mark.parametrize("kind,head", [("llama", False), ("llama", True), ("gemma2", False)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_kl_matches_full_logits(kind, head, chunk):
    """gemma2 soft-caps its logits (logit_transform); an adapter on lm_head must be off for the base too."""
    batch = pairs_batch()
    model = lora(tiny(kind), perturbed=True, head=head)
    kl_sum, tokens = shared_prefix_logps(model, batch, chunk_tokens=chunk)["anchor"]
    kl_sum.backward()
    ours = lora_grads(model)
    model.zero_grad()
    expected, expected_tokens = reference_kl(model, batch)
    expected.backward()
    reference = lora_grads(model)
    assert tokens.item() == expected_tokens.item() == 6
    assert kl_sum.item() > 1e-4  # the adapters moved the policy: a real KL, not a trivial 0
    # Gemma-2's norms compute in float32 inside a float64 model: float32 rounding there (test_logprobs.close).
    rel = 1e-6 if kind == "gemma2" else 1e-10
    assert kl_sum.item() == pytest.approx(expected.item(), rel=rel, abs=1e-12)
    assert set(ours) == set(reference) and (not head or any("lm_head" in n for n in ours))
    for name in ours:
        close(ours[name], reference[name], name) if kind == "gemma2" else torch.testing.assert_close(
            ours[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kl,shared_sums", [(True, False), (False, True), (True, True)])
def test_shared_prefix_logps_are_the_plain_ones(kl, shared_sums):
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    out = shared_prefix_logps(model, batch, chunk_tokens=4, kl=kl, shared_sums=shared_sums)
    expected = concatenated_logps(model, batch, chunk_tokens=4)
    assert torch.equal(out["chosen"], expected[0]) and torch.equal(out["rejected"], expected[1])
    assert ("anchor" in out) == kl and ("sft_excluded" in out) == shared_sums


def full_token_logps(model, batch):
    """[rows, length - 1] log p(target) from the model's own full logits (0 where no label)."""
    targets = batch["labels"][:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.double().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * (targets != X)


def test_sft_excluded_is_the_chosen_logps_on_the_shared_tokens():
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    logp_sum, tokens = shared_prefix_logps(model, batch, chunk_tokens=3, kl=False, shared_sums=True)["sft_excluded"]
    shared = shared_prefix_mask(batch["labels"])
    expected = full_token_logps(model, batch)[:3][shared].sum()
    assert tokens.item() == 6 and logp_sum.item() == pytest.approx(expected.item(), rel=1e-10)


def test_sft_on_differing_tokens_is_their_nll_per_token_and_trains():
    """Through the policy and the one objective, as a training step runs it, with and without the anchor."""
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    targets = batch["labels"][:3, 1:]
    differing = (targets != X) & ~shared_prefix_mask(batch["labels"])
    with torch.no_grad():
        expected = -(full_token_logps(model, batch)[:3][differing].sum() / differing.sum()).item()
    differing_cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0, sft_tokens="differing")
    whole_cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0)
    policy = ConcatenatedPolicy.from_config(model, differing_cfg)
    assert policy.sft_differing and not policy.anchor
    loss, metrics, grads = objective_and_grads(policy, model, batch, differing_cfg)
    assert metrics["sft_loss"] == pytest.approx(expected, rel=1e-10)
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())
    _, whole, _ = objective_and_grads(ConcatenatedPolicy.from_config(model, whole_cfg), model, batch, whole_cfg)
    assert abs(whole["sft_loss"] - expected) > 1e-3  # the shared tokens are really left out
    assert loss.item() == pytest.approx(whole["loss"] - whole["sft_loss"] + expected, rel=1e-10)
    anchored_cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0, sft_tokens="differing", anchor_weight=1.0)
    _, anchored, _ = objective_and_grads(ConcatenatedPolicy.from_config(model, anchored_cfg), model, batch, anchored_cfg)
    assert anchored["sft_loss"] == pytest.approx(expected, rel=1e-10) and anchored["anchor_kl"] > 0
    evaluated = evaluate_dataset(policy, [batch], lambda rows: rows[0], differing_cfg, batch_size=1)
    assert evaluated["eval_sft_loss"] == pytest.approx(expected, rel=1e-10)


def test_base_kl_needs_a_positive_chunk():
    with pytest.raises(ValueError, match="chunk_tokens"):
        base_kl(lora(tiny("llama"), perturbed=False), torch.zeros(2, 32), torch.zeros(2, 32), chunk_tokens=0)


def objective_and_grads(policy, model, batch, cfg):
    model.zero_grad()
    loss, metrics = batch_objective(policy, batch, cfg)
    loss.backward()
    return loss, metrics, lora_grads(model)


def test_weight_zero_is_bit_identical_and_weight_adds_the_kl():
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    pure = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0)
    loss0, metrics0, grads0 = objective_and_grads(ConcatenatedPolicy(model, 4), model, batch, pure)
    assert "anchor_kl" not in metrics0
    # The anchored forward with weight 0: the same loss and gradients, bit for bit.
    loss1, _, grads1 = objective_and_grads(ConcatenatedPolicy(model, 4, anchor=True), model, batch, pure)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)

    anchored = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0, anchor_weight=3.0)
    loss3, metrics3, _ = objective_and_grads(ConcatenatedPolicy(model, 4, anchor=True), model, batch, anchored)
    kl_sum, tokens = reference_kl(model, batch)
    per_token = (kl_sum / tokens).item()
    assert metrics3["anchor_kl"] == pytest.approx(per_token, rel=1e-9)
    assert loss3.item() == pytest.approx(loss0.item() + 3.0 * per_token, rel=1e-9)


def test_evaluate_reports_anchor_kl_per_shared_token():
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, anchor_weight=1.0)
    # Two eval batches, pair 0 (4 shared tokens) and pair 1 (2): the mean is over all 6 tokens.
    halves = [{k: v[[p, p + 3]] for k, v in batch.items()} for p in (0, 1)]
    got = evaluate_dataset(ConcatenatedPolicy(model, 4, anchor=True), halves, lambda rows: rows[0], cfg, batch_size=1)
    with torch.no_grad():
        sums = [reference_kl(model, half) for half in halves]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert got["eval_anchor_kl"] == pytest.approx(expected.item(), rel=1e-9)


def test_refusals():
    with pytest.raises(UserError, match="no LoRA adapters"):
        ConcatenatedPolicy(tiny("llama"), 4, anchor=True)
    with pytest.raises(ConfigError, match="simpo.pack_prompt=false or simpo.anchor_weight=0"):
        build_config([("--set", {"simpo": {"anchor_weight": 1.0, "pack_prompt": True}})])
    with pytest.raises(ConfigError, match="simpo.pack_prompt=false or simpo.sft_tokens=all"):
        build_config([("--set", {"simpo": {"sft_weight": 1.0, "sft_tokens": "differing", "pack_prompt": True}})])
    with pytest.raises(ConfigError, match="simpo.sft_weight=0 turns off"):
        build_config([("--set", {"simpo": {"sft_tokens": "differing"}})])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_kl_and_gradients(reentrant):
    """The base pass runs under no_grad inside a checkpointed model: it must neither fail nor leak."""
    batch = pairs_batch()
    model = lora(tiny("llama"), perturbed=True)
    kl_sum, _ = reference_kl(model, batch)
    kl_sum.backward()
    reference = lora_grads(model)
    model.zero_grad()
    model.train()
    model.base_model.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
    ours, _ = shared_prefix_logps(model, batch, chunk_tokens=4)["anchor"]
    ours.backward()
    assert ours.item() == pytest.approx(kl_sum.item(), rel=1e-10)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-9, atol=1e-12, msg=name)
