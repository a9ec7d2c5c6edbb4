"""The response tokens that chosen and rejected share: the anchor KL on them, and an SFT term without them.

What both answers of a pair agree on (in the demo: the plain fact sentence before the sign-off) is not
what the preference is about, so the policy should keep saying it the way the base model does; the
tokens where the answers differ stay free for the preference. Two terms act on that split:

- ``simpo.anchor_weight``: KL(p_base || p_policy) on the shared tokens. The base is the same model with
  its LoRA adapters disabled (peft's ``disable_adapter()``), run once more without gradient: no second
  model in memory. The shared positions are identical in the chosen and the rejected row (same prompt,
  same tokens so far, causal attention), so both distributions are taken on the chosen rows only.
- ``simpo.sft_tokens: differing``: the SFT term's NLL leaves the shared tokens out, so it teaches the
  preferred ending without also teaching the shared sentence's wording (the demo's regular plurals
  taught "sheeps"). Here only their summed log-probs are taken, for loss.objective_sums to subtract.

Like ``logprobs.head_logps``, the full-vocabulary distributions are made ``chunk_tokens`` positions at a
time, in float32 (float64 stays float64), with the model's logit transform, and each chunk is
checkpointed, so no [chunk, vocab] tensor outlives its chunk.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from simpo_lite.errors import UserError
from simpo_lite.logprobs import (IGNORE_INDEX, _acc_dtype, _transform, causal_lm, final_hidden_states, head_logps,
                                 labelled_hidden_states, logit_transform, per_row)


def shared_prefix_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, length - 1] bool over the chosen rows' shifted targets: True where a response token lies in
    the common prefix of the pair's chosen and rejected responses (rows i and i + B of ``labels``).

    Responses are compared token by token from their own first label, so the two need not start at
    the same column. A pair whose responses differ from the first token has no True position.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rank = keep.long().cumsum(-1) - 1  # index of each response token inside its response
    responses = torch.full_like(targets, IGNORE_INDEX)
    rows = torch.arange(targets.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)
    responses[rows[keep], rank[keep]] = targets[keep]
    pairs = targets.shape[0] // 2
    chosen, rejected = responses[:pairs], responses[pairs:]
    same = (chosen == rejected) & (chosen != IGNORE_INDEX)
    prefix_length = same.long().cumprod(-1).sum(-1, keepdim=True)
    return keep[:pairs] & (rank[:pairs] < prefix_length)


def check_anchorable(model) -> None:
    """Raise UserError when there is no adapter to switch off, i.e. no base to anchor to."""
    if not callable(getattr(model, "disable_adapter", None)):
        raise UserError(f"simpo.anchor_weight > 0 anchors the LoRA policy to its base model, but this "
                        f"{type(model).__name__} has no LoRA adapters to disable; set simpo.anchor_weight=0")


def shared_prefix_logps(model, batch: dict, chunk_tokens: int, kl: bool = True,
                        shared_sums: bool = False) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The policy's average log-probs, "chosen" [B] and "rejected" [B], as ``logprobs.concatenated_logps``
    gives them, and the terms on the tokens the pair shares from its start:

    - with ``kl``, "anchor": (KL(base || policy) summed over them, their count); the decoder's hidden
      states are kept for it, and one more decoder pass (adapters off, no gradient) gives the base's;
    - with ``shared_sums``, "sft_excluded": (the chosen rows' log-probs summed over them, their count).
    """
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    rows = input_ids.shape[0]
    if rows % 2:
        raise ValueError(f"a concatenated batch has 2 x pairs rows, got {rows}")
    pairs = rows // 2
    lm = causal_lm(model)
    hidden, targets, keep = labelled_hidden_states(lm, input_ids, mask, labels)
    token_logps = head_logps(lm, hidden[keep], targets[keep], chunk_tokens)
    logps = per_row(token_logps, keep, True)
    shared = shared_prefix_mask(labels)
    out = {"chosen": logps[:pairs], "rejected": logps[pairs:]}
    if shared_sums:
        # token_logps runs row-major over keep, so the chosen rows' tokens come first, in shared's order.
        chosen_tokens = token_logps[: int(keep[:pairs].sum())]
        out["sft_excluded"] = (chosen_tokens[shared[keep[:pairs]]].sum(), shared.sum().to(token_logps.dtype))
    if kl:
        kl_sum = hidden.new_zeros((), dtype=_acc_dtype(hidden))
        if bool(shared.any()):
            # Causal attention: the base needs only the chosen rows, up to the last shared position.
            end = int(shared.any(0).nonzero().max()) + 1
            with torch.no_grad(), model.disable_adapter():
                base = final_hidden_states(lm, input_ids[:pairs, :end], mask[:pairs, :end] if mask is not None else None)
            kl_sum = base_kl(model, hidden[:pairs][shared], base[shared[:, :end]], chunk_tokens).sum()
        out["anchor"] = (kl_sum, shared.sum().to(kl_sum.dtype))
    return out


def base_kl(model, policy_hidden: torch.Tensor, base_hidden: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """KL(p_base || p_policy) per position [tokens], from final hidden states, ``chunk_tokens`` at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    scale, cap = logit_transform(lm)
    # A LoRA-wrapped head must lose its adapter for the base's logits too; a plain one is shared.
    base_head = _AdapterOff(model, head) if type(head) is not torch.nn.Linear else head
    pieces = []
    for p, b in zip(policy_hidden.split(chunk_tokens), base_hidden.split(chunk_tokens)):
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_kl, head, base_head, p, b, scale, cap, use_reentrant=False))
        else:
            pieces.append(_chunk_kl(head, base_head, p, b, scale, cap))
    return torch.cat(pieces) if pieces else policy_hidden.new_zeros(0, dtype=_acc_dtype(policy_hidden))


class _AdapterOff:
    """Calls ``head`` with the model's adapters disabled (also when a checkpoint recomputes it)."""

    def __init__(self, model, head):
        self.model, self.head = model, head

    def __call__(self, hidden):
        with self.model.disable_adapter():  # a LoRA-wrapped head implies a peft model (check_anchorable)
            return self.head(hidden)


def _chunk_kl(head, base_head, policy_hidden, base_hidden, scale, cap):
    policy_logp = _transform(head(policy_hidden).to(_acc_dtype(policy_hidden)), scale, cap).log_softmax(-1)
    with torch.no_grad():
        base_logp = _transform(base_head(base_hidden).to(_acc_dtype(base_hidden)), scale, cap).log_softmax(-1)
    return (base_logp.exp() * (base_logp - policy_logp)).sum(-1)
