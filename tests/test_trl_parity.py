"""Parity with TRL's CPOTrainer (loss_type="simpo") on the same tiny model and token batch.

A real CPOTrainer tokenizes a two-pair dataset and collates it; its own ``get_batch_loss_metrics``
(full logits, log-softmax over the vocabulary, average log-probs) gives the reference loss, metrics
and gradients. simpo_lite gets the same tokens, stacked [chosen; rejected] and padded to one length.
"""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from simpo_lite.config import SimpoConfig
from simpo_lite.logprobs import IGNORE_INDEX, concatenated_logps
from simpo_lite.loss import simpo_objective
from simpo_lite.policy import ConcatenatedPolicy, batch_objective, chosen_lengths, evaluate_dataset
from test_logprobs import VOCAB, tiny

try:  # TRL >= 1.0 keeps CPO under experimental
    import trl.experimental.cpo as trl_cpo
except ImportError:
    import trl as trl_cpo

WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
PAIRS = {  # different prompt and response lengths, so padding and averaging both matter
    "prompt": ["w1 w2 w3 w4", "w5 w6"],
    "chosen": [" w7 w8 w9", " w10 w11 w12 w13 w14 w15"],
    "rejected": [" w16 w17 w18 w19 w20", " w21"],
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def trl_trainer(model, tmp_path, **overrides):
    args = trl_cpo.CPOConfig(output_dir=str(tmp_path), loss_type="simpo", beta=2.0, simpo_gamma=1.0,
                             max_length=64, per_device_train_batch_size=2, bf16=False, fp16=False,
                             use_cpu=True, report_to=[], **overrides)
    return trl_cpo.CPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS),
                              processing_class=word_tokenizer())


def stacked(trl_batch) -> dict:
    """TRL's collated pairs as one [chosen; rejected] batch, right-padded to the longer side."""
    length = max(trl_batch["chosen_input_ids"].shape[1], trl_batch["rejected_input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return {key: torch.cat([pad(trl_batch[f"chosen_{key}"], value), pad(trl_batch[f"rejected_{key}"], value)])
            for key, value in [("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)]}


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


# A trainable tied head (per-chunk checkpoint path) and a frozen soft-capped head (fused path).
@pytest.mark.parametrize("kind,tied,head_trainable", [("llama", True, True), ("gemma2", False, False)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_metrics_and_grads_match_trl_simpo(kind, tied, head_trainable, label_smoothing, tmp_path):
    model = tiny(kind, tied)
    model.get_output_embeddings().weight.requires_grad_(head_trainable)
    trainer = trl_trainer(model, tmp_path, cpo_alpha=0.0, label_smoothing=label_smoothing)
    trl_batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch)
    trl_loss.backward()
    trl_grads = grads(model)

    cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=1.0 / 2.0, label_smoothing=label_smoothing)  # gamma 1 / beta 2
    chosen, rejected = concatenated_logps(model, stacked(trl_batch), chunk_tokens=3)
    loss, metrics = simpo_objective(chosen, rejected, cfg)
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-9)
    assert {k: metrics[k] for k in METRICS} == pytest.approx({k: trl_metrics[k] for k in METRICS}, abs=1e-9)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, trl_grads[name], atol=1e-9 + 1e-6 * grad.abs().max().item(), rtol=0)


def test_trl_default_cpo_alpha_is_our_token_weighted_sft_term(tmp_path):
    """TRL's default cpo_alpha=1 adds the chosen NLL (CPO-SimPO): sft_weight=1 with token weighting."""
    model = tiny("llama", tied=True)
    trainer = trl_trainer(model, tmp_path)
    assert trainer.cpo_alpha == 1.0
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch)

    batch = stacked(trl_batch)
    assert chosen_lengths(batch).tolist() == [4, 7]  # responses of 3 and 6 words, each with its EOS
    cfg = SimpoConfig(beta=2.0, gamma_beta_ratio=0.5, sft_weight=1.0)
    # The path a training step and an evaluation take: the policy's forward, then the one composer.
    policy = ConcatenatedPolicy(trainer.model, chunk_tokens=3)
    loss, metrics = batch_objective(policy, batch, cfg)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-9)
    assert metrics["sft_loss"] == pytest.approx(trl_metrics["nll_loss"], abs=1e-9)
    evaluated = evaluate_dataset(policy, [batch], lambda rows: rows[0], cfg, batch_size=1)
    assert evaluated["eval_loss"] == pytest.approx(trl_loss.item(), abs=1e-9)
    chosen, rejected = concatenated_logps(trainer.model, batch)
    pure, _ = simpo_objective(chosen, rejected, SimpoConfig(beta=2.0, gamma_beta_ratio=0.5))
    assert abs(pure.item() - trl_loss.item()) > 1.0  # the pitfall: TRL's default is not pure SimPO
