"""simpo.pack_tokens: several [prompt | chosen | rejected] pairs per row must give what the padded
(unpacked) batch gives, per pair and in the pair order, in float64: log-probs and every gradient."""

import pytest
import torch

from simpo_lite.data import padding_share
from simpo_lite.data.batching import PairCollator
from simpo_lite.data.packing import CHOSEN, PAD, PROMPT, REJECTED, PackedPairCollator, fill_rows, make_collator
from simpo_lite.errors import UserError
from simpo_lite.logprobs import concatenated_logps
from simpo_lite.packed import packed_attention_mask, packed_logps
from simpo_lite.policy import chosen_lengths
from test_logprobs import tiny
from test_packing import X, assert_runs_match, assert_same, feature, random_features, train_records, values_and_grads
from tiny_models import tiny_model_folder, write_pairs

# (prompt, chosen, rejected) lengths from 1 to 40 tokens: a padded batch is mostly padding here.
SHAPES = [(2, 40, 3), (1, 1, 2), (12, 5, 30), (3, 2, 1), (7, 18, 18), (1, 3, 9)]
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


def test_mask_keeps_pairs_apart():
    segments = torch.tensor([[PROMPT, CHOSEN, REJECTED, PROMPT, CHOSEN, PAD]])
    pairs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    allowed = packed_attention_mask(segments, torch.float32, pairs)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0],   # rejected: its prompt and itself
                             [0, 0, 0, 1, 0, 0],   # the next pair's prompt sees nothing of pair 0
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
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


def test_a_mask_that_lets_pairs_see_each_other_is_caught():
    """The tolerance has teeth: a row's later pairs attending to its earlier ones is far outside it."""
    import simpo_lite.packed as packed

    honest = packed.packed_attention_mask
    model = tiny("llama")
    features = random_features(SHAPES, seed=1)
    padded, packed_batch = PairCollator(0)(features), PackedPairCollator(0, BUDGET)(features)
    with torch.no_grad():
        expected, _ = concatenated_logps(model, padded)
        packed.packed_attention_mask = lambda segments, dtype, pairs=None: honest(segments, dtype)
        try:
            got, _ = packed.packed_logps(model, packed_batch)
        finally:
            packed.packed_attention_mask = honest
    assert (got - expected).abs().max() > 1e-2


def test_pack_tokens_needs_pack_prompt():
    with pytest.raises(UserError, match=r"simpo\.pack_tokens=512.*simpo\.pack_prompt=true"):
        make_collator(0, pack_prompt=False, pack_tokens=512)
    assert make_collator(0, pack_prompt=True, pack_tokens=512).pack_tokens == 512


def test_trainer_steps_and_evals_match_padded(tmp_path):
    """simpo.pack_tokens wired through config, collator, policy and evaluation: a 4-bit LoRA run gives
    the padded run's losses, metrics and evaluations (2 pairs a micro-batch share one 128-token row)."""
    model, data = tiny_model_folder(tmp_path / "model", tie=True), write_pairs(tmp_path / "pairs.jsonl", 12)
    padded = train_records(tmp_path, model, data, False)
    assert_runs_match(train_records(tmp_path, model, data, True, pack_tokens=128), padded)
