"""simpo.pack_prompt: one [prompt | chosen | rejected] row per pair must give what two unpacked rows give.

References are the unpacked path (itself checked against full logits in test_logprobs.py), in float64:
log-probs, gradients of every trainable parameter, and a trainer step's loss.
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tiny_models import tiny_model_folder, write_config, write_pairs
from simpo_lite.data.batching import PairCollator
from simpo_lite.data.packing import CHOSEN, PAD, PROMPT, REJECTED, PackedPairCollator, make_collator, pack_pair
from simpo_lite.errors import UserError
from simpo_lite.logprobs import IGNORE_INDEX, concatenated_logps
from simpo_lite.policy import ConcatenatedPolicy
from simpo_lite.packed import check_packable, packed_logps
from simpo_lite.segments import SegmentLayout
from test_logprobs import VOCAB, close, tiny

X = IGNORE_INDEX


def feature(prompt, chosen, rejected):
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": [X] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [X] * len(prompt) + rejected}


def random_features(shapes, seed=0):
    """Pairs of (prompt, chosen, rejected) lengths, random token ids."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [feature(draw(p), draw(c), draw(r)) for p, c, r in shapes]


# Different prompt and response lengths, chosen longer or shorter than rejected, one-token responses,
# so both layouts have padding in different places.
SHAPES = [(3, 4, 2), (5, 1, 6), (1, 3, 3), (6, 2, 1)]


def test_packed_row_layout_by_hand():
    row = pack_pair(feature([10, 11, 12], [20, 21], [30, 31, 32]))
    assert row["input_ids"] == [10, 11, 12, 20, 21, 30, 31, 32]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 3, 4, 5]
    assert row["segment_ids"] == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3
    # position 2 (last prompt token) predicts the first token of both responses
    assert row["chosen_targets"] == [X, X, 20, 21, X, X, X, X]
    assert row["rejected_targets"] == [X, X, 30, X, X, 31, 32, X]


def test_collator_pads_rows_and_counts_real_tokens():
    features = [feature([1, 2], [3], [4, 5]), feature([6], [7, 8, 9], [10])]
    batch = PackedPairCollator(pad_token_id=0)(features)
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert batch["attention_mask"].sum() == 10  # each prompt once: 5 + 5 real tokens
    short = PackedPairCollator(pad_token_id=0)([features[0], feature([1], [2], [3])])  # padded to 5
    assert short["segment_ids"][1].tolist() == [PROMPT, CHOSEN, REJECTED] + [PAD] * 2
    assert short["rejected_targets"][1].tolist() == [3] + [X] * 4
    assert isinstance(make_collator(0, True), PackedPairCollator) and isinstance(make_collator(0, False), PairCollator)


def test_collator_refuses_pairs_without_a_shared_prompt():
    bad = feature([1, 2], [3], [4])
    bad["rejected_input_ids"][0] = 9
    with pytest.raises(UserError, match="same, non-empty"):
        pack_pair(bad)


def visible(layout: SegmentLayout) -> torch.Tensor:
    """[rows, T, T]: which keys each query attends to under a segment layout, bottom-right causal within
    each segment (query j of lq sees keys 0 .. lk - lq + j of its lk), as flash_attn_varlen_func does."""
    seen = torch.zeros(layout.rows * layout.length, layout.rows * layout.length, dtype=torch.bool)
    for i in range(len(layout.cu_q) - 1):
        queries = layout.q_index[layout.cu_q[i]:layout.cu_q[i + 1]].tolist()
        keys = layout.k_index[layout.cu_k[i]:layout.cu_k[i + 1]].tolist()
        for j, q in enumerate(queries):
            seen[q, keys[:len(keys) - len(queries) + j + 1]] = True
    # Segments never cross rows, so the flat [N, N] matrix is block-diagonal in rows.
    rows = [seen[r * layout.length:(r + 1) * layout.length, r * layout.length:(r + 1) * layout.length]
            for r in range(layout.rows)]
    assert int(seen.sum()) == sum(int(r.sum()) for r in rows)
    return torch.stack(rows)


def test_segments_keep_rejected_away_from_chosen_and_padding():
    segments = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PAD]])
    allowed = visible(SegmentLayout.from_batch(segments, torch.tensor([[0, 0, 0, 0, 0, -1]])))[0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],   # rejected: prompt and itself, not chosen
                             [0, 0, 0, 0, 0, 0]],  # padding: nothing (its output is zeros)
                            dtype=torch.bool)
    assert torch.equal(allowed, expected)


def unpacked_and_packed(features):
    return PairCollator(pad_token_id=0)(features), PackedPairCollator(pad_token_id=0)(features)


def values_and_grads(model, logps_fn, batch, weights):
    """(chosen, rejected) log-probs and every trainable parameter's grad of a weighted sum of them."""
    chosen, rejected = logps_fn(model, batch)
    (weights[0] * chosen + weights[1] * rejected).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return chosen.detach(), rejected.detach(), grads


def assert_same(ours, reference):
    # close() allows float32 rounding relative to each tensor's scale. A float64 Llama still rounds to
    # float32 inside RMSNorm (forward and backward) and, with eager attention, in the softmax; where
    # the unpacked layout rounds the chosen and the rejected row's gradient of a prompt token apart,
    # the packed one rounds their sum, so they differ at ~1e-7 relative. A wrong mask or position is
    # orders of magnitude off (test_a_wrong_mask_is_caught).
    close(ours[0], reference[0], "chosen")
    close(ours[1], reference[1], "rejected")
    assert ours[2].keys() == reference[2].keys()
    for name in reference[2]:
        close(ours[2][name], reference[2][name], name)


WEIGHTS = torch.tensor([[1.0, -2.0, 0.5, 1.5], [-1.0, 0.7, 2.0, -0.3]], dtype=torch.float64)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("head_trainable", [True, False])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_values_and_grads_match_unpacked(tied, head_trainable, kernel):
    model = tiny("llama", tied=tied)
    model.config._attn_implementation = kernel
    model.get_output_embeddings().weight.requires_grad_(head_trainable)
    unpacked, packed = unpacked_and_packed(random_features(SHAPES))
    reference = values_and_grads(model, lambda m, b: concatenated_logps(m, b, chunk_tokens=5), unpacked, WEIGHTS)
    ours = values_and_grads(model, lambda m, b: packed_logps(m, b, chunk_tokens=5), packed, WEIGHTS)
    assert_same(ours, reference)


def test_a_wrong_layout_is_caught(monkeypatch):
    """The tolerance has teeth: letting rejected tokens see the chosen ones is far outside it."""
    honest = SegmentLayout.from_batch

    def leaky(segment_ids, pair_index):
        return honest(torch.where(segment_ids == REJECTED, CHOSEN, segment_ids), pair_index)

    model = tiny("llama")
    unpacked, packed_batch = unpacked_and_packed(random_features(SHAPES))
    with torch.no_grad():
        _, expected = concatenated_logps(model, unpacked)
        monkeypatch.setattr(SegmentLayout, "from_batch", leaky)
        _, got = packed_logps(model, packed_batch)
    assert (got - expected).abs().max() > 1e-2


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_forwards_without_a_layout_keep_the_models_own_kernel(kernel):
    """After a packed forward installs segment attention, generation and unpacked forwards (left padding
    and its mask included) compute exactly what the model's own kernel does."""
    from simpo_lite.segments import PREFIX

    model = tiny("llama")
    model.config._attn_implementation = kernel
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        packed_logps(model, unpacked_and_packed(random_features(SHAPES))[1])
        assert model.config._attn_implementation == PREFIX + kernel
        # Bit for bit, NaN included: in float64, eager gives NaN where a query sees no key (left padding).
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0,
                                   equal_nan=True)
        assert not before[1].isnan().any()


def test_a_model_that_drops_the_layout_is_refused(monkeypatch):
    """A decoder that does not pass keywords on to attention would attend across the whole row."""
    model = tiny("llama")
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, segment_layout=None, **kw: forward(*a, **kw))
    with pytest.raises(UserError, match=r"only 0 of its \d+ attention layers took the packed layout"):
        packed_logps(model, unpacked_and_packed(random_features(SHAPES))[1])


def test_lora_grads_match_unpacked_with_checkpointing():
    """LoRA on attention, MLP and the head, gradient checkpointing on: the training configuration."""
    from peft import LoraConfig, get_peft_model

    base = tiny("llama", tied=False)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    model.to(torch.float64).train()
    unpacked, packed = unpacked_and_packed(random_features(SHAPES, seed=3))
    reference = values_and_grads(model, lambda m, b: concatenated_logps(m, b, chunk_tokens=3), unpacked, WEIGHTS)
    ours = values_and_grads(model, lambda m, b: packed_logps(m, b, chunk_tokens=3), packed, WEIGHTS)
    assert any("lm_head.lora" in n for n in ours[2]) and all("lora_" in n for n in ours[2])
    assert_same(ours, reference)


def test_policy_dispatches_on_pack_prompt():
    model = tiny("llama")
    unpacked, packed = unpacked_and_packed(random_features(SHAPES))
    with torch.no_grad():
        expected = ConcatenatedPolicy(model, 4)(**unpacked)
        got = ConcatenatedPolicy(model, 4, pack_prompt=True)(**packed)
    assert set(got) == set(expected) == {"chosen", "rejected"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-10, rtol=0)


def test_float32_packed_is_close_to_unpacked():
    model = tiny("llama", tied=True, dtype=torch.float32)
    unpacked, packed = unpacked_and_packed(random_features(SHAPES, seed=5))
    with torch.no_grad():
        for a, b in zip(packed_logps(model, packed), concatenated_logps(model, unpacked)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pair_without_rejected_labels_is_an_error():
    features = random_features(SHAPES[:1]) + [feature([5, 6], [7], [])]
    with pytest.raises(ValueError, match=r"pairs \[1\] have no response tokens"):
        packed_logps(tiny("llama"), PackedPairCollator(0)(features))


# ---- refusals ------------------------------------------------------------------------------------

def test_refuses_sliding_window_models():
    with pytest.raises(UserError, match=r"simpo\.pack_prompt.*gemma2.*simpo\.pack_prompt=false"):
        ConcatenatedPolicy(tiny("gemma2"), 4, pack_prompt=True)
    ConcatenatedPolicy(tiny("gemma2"), 4)  # unpacked stays available


def test_refuses_kernels_segments_cannot_stand_in_for():
    model = tiny("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match=r"'flex_attention'.*model\.attn_implementation=sdpa"):
        check_packable(model)


def test_accepts_plain_llama():
    for kernel in ("sdpa", "eager", "flash_attention_2"):
        model = tiny("llama")
        model.config._attn_implementation = kernel
        assert check_packable(model) is None  # no refusal
        assert ConcatenatedPolicy(model, chunk_tokens=8, pack_prompt=True).pack_prompt


# ---- a training run ------------------------------------------------------------------------------

def test_row_lengths_follow_the_layout():
    from simpo_lite.run_setup import row_lengths

    train = {"chosen_input_ids": [[1] * 7, [1] * 4], "rejected_input_ids": [[1] * 5, [1] * 9], "prompt_length": [3, 2]}
    assert row_lengths(train, pack_prompt=False) == [7, 9]
    assert row_lengths(train, pack_prompt=True) == [9, 11]


def train_records(tmp_path, model, data, pack: bool, pack_tokens: int = 0, micro_batch_size: int = 2) -> list[dict]:
    run = tmp_path / f"run-pack-{pack}-{pack_tokens}"
    config = write_config(tmp_path / f"pack-{pack}-{pack_tokens}.yaml", model, data, run, max_steps=2, eval_steps=2,
                          micro_batch_size=micro_batch_size)
    cfg = yaml.safe_load(config.read_text())
    cfg["simpo"]["pack_prompt"] = pack
    cfg["simpo"]["pack_tokens"] = pack_tokens
    cfg["lora"]["dropout"] = 0.0  # dropout masks are drawn per tensor element, so they follow the layout
    cfg["model"]["compute_dtype"] = "fp32"  # auto is bf16 on CPUs with AVX512-BF16, whose rounding follows the layout
    cfg["data"]["group_by_length"] = False  # packed rows group by another length: same batches for both
    config.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "simpo_lite", "train", "--config", str(config), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_steps_and_evals_match_unpacked(tmp_path):
    """4-bit base, LoRA, gradient checkpointing, float32: the same losses, metrics and evaluations."""
    model, data = tiny_model_folder(tmp_path / "model", tie=True), write_pairs(tmp_path / "pairs.jsonl", 12)
    unpacked, packed = train_records(tmp_path, model, data, False), train_records(tmp_path, model, data, True)
    assert_runs_match(packed, unpacked)


def assert_runs_match(packed: list[dict], unpacked: list[dict]) -> None:
    assert [r["step"] for r in packed] == [r["step"] for r in unpacked] == [0, 1, 2, 2]
    for ours, reference in zip(packed, unpacked):
        # After the last update AdamW divides each gradient entry by its own running size, which turns
        # float32 rounding of near-zero entries (packed rows sum in another order) into visible weight
        # differences: measured 1.2e-4 relative on the step-2 eval with transformers 5.24 / peft 0.21.
        rel = 5e-4 if ours["step"] == 2 and "eval_loss" in ours else 1e-4
        for key in ("loss", "eval_loss", "logps/chosen", "logps/rejected", "eval_logps/chosen", "grad_norm"):
            if key in reference:
                assert ours[key] == pytest.approx(reference[key], rel=rel, abs=1e-5), (ours["step"], key)
    train = [(p, u) for p, u in zip(packed, unpacked) if "loss" in u]
    for ours, reference in train:  # the prompt counted once: fewer real tokens per step
        assert ours["tokens_per_s"] * ours["step_time_s"] < reference["tokens_per_s"] * reference["step_time_s"]
