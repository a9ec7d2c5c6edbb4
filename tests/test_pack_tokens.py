"""simpo.pack_tokens: several [prompt | chosen | rejected] pairs per row must give what the padded
(unpacked) batch gives, per pair and in the pair order, in float64: log-probs and every gradient."""

import random

import pytest
import torch

from simpo_lite.data import padding_share
from simpo_lite.data.batching import PairCollator
from simpo_lite.data.packing import (CHOSEN, PAD, PROMPT, REJECTED, PackedPairCollator, fill_rows, make_collator,
                                     token_budget_batches)
from simpo_lite.logprobs import concatenated_logps
from simpo_lite.packed import packed_logps
from simpo_lite.segments import SegmentLayout
from simpo_lite.policy import chosen_lengths
from test_logprobs import tiny
from test_packing import X, visible, assert_runs_match, assert_same, feature, random_features, train_records, values_and_grads
from tiny_models import tiny_model_folder, write_pairs

# (prompt, chosen, rejected) lengths from 1 to 40 tokens: a padded batch is mostly padding here.
SHAPES = [(2, 40, 3), (1, 1, 2), (12, 5, 30), (3, 2, 1), (7, 18, 18), (1, 3, 9)]
FILL = 0.95  # token-counted micro-batches fill at least this share of their rows (0.98 in the test below)
BUDGET = 64  # rows of up to 64 tokens: the 6 pairs (45, 4, 47, 6, 43, 13 tokens) fill 3 rows: 47+13+4, 45+6, 43


def test_first_fit_decreasing_by_hand():
    # longest first: 9 opens row A, 5 opens row B, 4 joins B, 3 fits neither (1 free each): row C
    assert fill_rows([5, 9, 3, 4], budget=10) == [[1], [0, 3], [2]]
    assert fill_rows([12, 2, 3], budget=10) == [[0], [1, 2]]  # a pair over budget gets its own row


def test_rows_hold_several_pairs_with_their_own_positions():
    features = [feature([1, 2], [3], [4, 5]), feature([6], [7, 8], [9]), feature([1, 2, 3, 4], [5], [6])]
    batch = PackedPairCollator(pad_token_id=0, pack_tokens=9)(features)
    # lengths 5, 4, 6: 6 opens row 0, 5 opens row 1, 4 joins row 1 (pair order kept inside it)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["pair_index"].tolist() == [[2] * 6 + [-1] * 3, [0] * 5 + [1] * 4]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 2, 3, 0, 1, 2, 1]
    assert batch["segment_ids"][1].tolist() == [PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED,
                                                PROMPT, CHOSEN, CHOSEN, REJECTED]
    assert batch["chosen_targets"][1].tolist() == [X, 3, X, X, X, 7, 8, X, X]
    assert batch["rejected_targets"][1].tolist() == [X, 4, X, 5, X, 9, X, X, X]
    assert chosen_lengths(batch).tolist() == [1, 2, 1]  # per pair, in pair order
    assert padding_share(batch) == pytest.approx(3 / 18)


def test_segments_keep_pairs_apart():
    segments = torch.tensor([[PROMPT, CHOSEN, REJECTED, PROMPT, CHOSEN, PAD]])
    pairs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    allowed = visible(SegmentLayout.from_batch(segments, pairs))[0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0],   # rejected: its prompt and itself
                             [0, 0, 0, 1, 0, 0],   # the next pair's prompt sees nothing of pair 0
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_padding_free_has_far_less_padding():
    features = random_features(SHAPES)
    padded, packed = PairCollator(0)(features), PackedPairCollator(0, BUDGET)(features)
    assert packed["input_ids"].shape[0] == 3
    # padded: 12 rows of 42 slots hold 184 tokens; packed: 3 rows of 64 hold 158 (each prompt once)
    assert padding_share(padded) == pytest.approx(1 - 184 / (12 * 42))
    assert padding_share(packed) == pytest.approx(1 - 158 / (3 * 64))


WEIGHTS = torch.tensor([[1.0, -2.0, 0.5, 1.5, -0.4, 0.9], [-1.0, 0.7, 2.0, -0.3, 1.1, -0.6]], dtype=torch.float64)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_values_and_grads_match_padded(tied, kernel):
    model = tiny("llama", tied=tied)
    model.config._attn_implementation = kernel
    features = random_features(SHAPES, seed=1)
    padded, packed = PairCollator(0)(features), PackedPairCollator(0, BUDGET)(features)
    reference = values_and_grads(model, lambda m, b: concatenated_logps(m, b, chunk_tokens=7), padded, WEIGHTS)
    ours = values_and_grads(model, lambda m, b: packed_logps(m, b, chunk_tokens=7), packed, WEIGHTS)
    assert_same(ours, reference)
    assert torch.equal(chosen_lengths(packed), chosen_lengths(padded))


def test_lora_grads_match_padded_with_checkpointing():
    from peft import LoraConfig, get_peft_model

    base = tiny("llama", tied=False)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    model.to(torch.float64).train()
    features = random_features(SHAPES, seed=2)
    padded, packed = PairCollator(0)(features), PackedPairCollator(0, BUDGET)(features)
    reference = values_and_grads(model, lambda m, b: concatenated_logps(m, b, chunk_tokens=5), padded, WEIGHTS)
    ours = values_and_grads(model, lambda m, b: packed_logps(m, b, chunk_tokens=5), packed, WEIGHTS)
    assert all("lora_" in n for n in ours[2])
    assert_same(ours, reference)


def test_a_layout_that_lets_pairs_see_each_other_is_caught(monkeypatch):
    """The tolerance has teeth: a row's later pairs attending to its earlier ones is far outside it."""
    honest = SegmentLayout.from_batch
    model = tiny("llama")
    features = random_features(SHAPES, seed=1)
    padded, packed_batch = PairCollator(0)(features), PackedPairCollator(0, BUDGET)(features)
    with torch.no_grad():
        expected, _ = concatenated_logps(model, padded)
        # A layout blind to pair boundaries: every real token of a row counted in pair 0.
        monkeypatch.setattr(SegmentLayout, "from_batch",
                            lambda segments, pairs: honest(segments, torch.where(pairs < 0, pairs, 0)))
        got, _ = packed_logps(model, packed_batch)
    assert (got - expected).abs().max() > 1e-2


def test_pack_tokens_needs_pack_prompt():
    from simpo_lite.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=r"simpo\.pack_tokens=512.*simpo\.pack_prompt=true"):
        resolve(sets=["simpo.pack_tokens=512"])
    assert resolve(sets=["simpo.pack_tokens=512", "simpo.pack_prompt=true"]).simpo.pack_tokens == 512
    assert make_collator(0, pack_prompt=True, pack_tokens=512).pack_tokens == 512


def test_trainer_steps_and_evals_match_padded(tmp_path):
    """simpo.pack_tokens wired through config, token-counted batches, collator, policy and evaluation: a
    4-bit LoRA run gives the padded run's losses, metrics and evaluations. One row of 2048 tokens holds
    all 10 training pairs (each at most 128 tokens), so each step sees what a padded micro-batch of 16
    pairs sees: the whole training set."""
    model, data = tiny_model_folder(tmp_path / "model", tie=True), write_pairs(tmp_path / "pairs.jsonl", 12)
    padded = train_records(tmp_path, model, data, False, micro_batch_size=16)
    packed = train_records(tmp_path, model, data, True, pack_tokens=2048, micro_batch_size=1)
    assert_runs_match(packed, padded)
    assert [r["pairs"] for r in packed if "loss" in r] == [r["pairs"] for r in padded if "loss" in r] == [10, 10]


def test_token_budget_batches_cover_the_epoch_in_full_rows():
    """Training micro-batches counted in tokens: every pair once an epoch, each micro-batch packed by
    the collator's own fill_rows into at most `rows` rows of the budget, the fullest one first."""
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(300)] + [150]  # the last pair is over the budget
    batches = token_budget_batches(lengths, rows=2, budget=100, seed=3, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        rows = fill_rows([lengths[i] for i in batch], 100)
        assert len(rows) <= 2
        assert all(len(row) == 1 or sum(lengths[batch[i]] for i in row) <= 100 for row in rows)
    assert 300 in batches[0]  # its 2 x 150 slots are the most any micro-batch needs
    assert sum(lengths) / (2 * 100 * len(batches)) > FILL
    assert batches == token_budget_batches(lengths, rows=2, budget=100, seed=3, epoch=0)
    assert batches != token_budget_batches(lengths, rows=2, budget=100, seed=3, epoch=1)


def test_a_step_weighs_every_pair_the_same_whatever_micro_batch_holds_it():
    """Token-counted micro-batches hold different numbers of pairs (3 and 1 here): one optimizer step
    over them must follow the gradient of the mean loss over its 4 pairs, as one batch of 4 would."""
    from accelerate import Accelerator

    from simpo_lite.config import Config, SimpoConfig, TrainConfig
    from simpo_lite.policy import ConcatenatedPolicy, batch_objective
    from simpo_lite.run_folder import TrainerState
    from simpo_lite.run_setup import RunParts
    from simpo_lite.trainer import Trainer

    model = tiny("llama")
    features = random_features(SHAPES[:4], seed=3)
    cfg = Config(simpo=SimpoConfig(pack_prompt=True, pack_tokens=BUDGET),
                 train=TrainConfig(micro_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.0))
    collate = PackedPairCollator(0, BUDGET)
    policy = ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens, True)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = batch_objective(policy, collate(features), cfg.simpo)
    expected = torch.autograd.grad(loss, params)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = RunParts(cfg, Accelerator(cpu=True), None, features, None, collate, lambda epoch: [[0, 1, 2], [3]],
                     policy, optimizer, scheduler, 1, params, TrainerState(0, 0, 0), None, None)
    record = Trainer(cfg, parts, quiet=True).train_step()
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-12)
    for p, start, grad in zip(params, before, expected):
        torch.testing.assert_close(start - p.detach(), grad, rtol=1e-9, atol=1e-12)


def test_an_unpacked_forward_reaches_a_kernel_that_looks_itself_up_by_name():
    """transformers' flash-attention function finds its kernel by the config's implementation name; after
    packing (which renames it) a plain forward, as in generation health, must still call it by its own."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from simpo_lite.segments import use_segment_attention

    seen = []

    def by_name(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("looks_up_by_name", by_name)
    AttentionMaskInterface.register("looks_up_by_name", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = tiny("llama")
    model.config._attn_implementation = "looks_up_by_name"
    use_segment_attention(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert seen and set(seen) == {"looks_up_by_name"}
    assert model.config._attn_implementation.startswith("simpo_segments+")  # restored after the call


def test_flash_varlen_gets_16_bit_inputs_and_gives_back_the_callers_type(monkeypatch):
    """flash-attention refuses fp32; a model run without autocast (model.frozen_dtype=fp32) hands it fp32."""
    import sys
    import types

    from simpo_lite import segments

    got = {}

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        got.update(dtypes={q.dtype, k.dtype, v.dtype}, cu=cu_q.dtype, max=(max_q, max_k))
        return q

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    q = torch.randn(7, 4, 8)
    out = segments.flash_varlen(q, q[:, :2], q[:, :2], [0, 3, 7], [0, 3, 7], None, 0.0)
    assert got == {"dtypes": {torch.bfloat16}, "cu": torch.int32, "max": (4, 4)}
    assert out.dtype == torch.float32 and out.shape == q.shape
