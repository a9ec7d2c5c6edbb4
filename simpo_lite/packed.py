"""Log-probs of packed [prompt | chosen | rejected] rows (simpo.pack_prompt), equal to the unpacked ones.

The decoder sees each prompt once. What makes a packed row compute the same numbers as two unpacked
rows is a 4D attention mask (rejected tokens never see chosen ones) and position ids that restart
after the prompt (simpo_lite.data.packing builds both). transformers passes an already-4D mask to the
attention kernel unchanged; sdpa and eager both take an additive float mask (eager adds it to the
scores, and would add a boolean mask as 0/1), so the mask is additive: 0 where a query may attend,
the dtype's minimum elsewhere. Kernels that build their own mask (flash attention) or models whose
layers restrict attention further (sliding windows) would silently compute something else: refused.
"""

from __future__ import annotations

import inspect

import torch

from simpo_lite.data.packing import PAD, PROMPT
from simpo_lite.errors import UserError
from simpo_lite.logprobs import IGNORE_INDEX, causal_lm, check_counts, final_hidden_states, head_logps, text_config

MASKED_KERNELS = ("sdpa", "eager")  # attention implementations that apply a custom 4D mask as given


def packed_logps(model, batch: dict, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Average log-probs [pairs] of the chosen and of the rejected responses of a packed batch, in the
    order of its pair_index (the collator's pair order), however many pairs a row holds."""
    lm = causal_lm(model)
    # Like the unpacked path, drop the last column: it holds a row's last token or padding, and a
    # row's last token is the final rejected token, which predicts nothing and no later token sees.
    chosen_t, rejected_t = batch["chosen_targets"][:, :-1], batch["rejected_targets"][:, :-1]
    keep_c, keep_r = chosen_t != IGNORE_INDEX, rejected_t != IGNORE_INDEX
    pair_index = batch["pair_index"][:, :-1]
    pairs = int(batch["pair_index"].max()) + 1
    mask = packed_attention_mask(batch["segment_ids"][:, :-1], lm.get_input_embeddings().weight.dtype, pair_index)
    hidden = final_hidden_states(lm, batch["input_ids"][:, :-1], mask, batch["position_ids"][:, :-1])
    # One head pass over both sides; the last prompt position appears in both (it predicts the first
    # chosen and the first rejected token) and its gradient is the sum of the two.
    token_logps = head_logps(lm, torch.cat([hidden[keep_c], hidden[keep_r]]),
                             torch.cat([chosen_t[keep_c], rejected_t[keep_r]]), chunk_tokens)
    n_chosen = int(keep_c.sum())
    return (per_pair_average(token_logps[:n_chosen], pair_index[keep_c], pairs),
            per_pair_average(token_logps[n_chosen:], pair_index[keep_r], pairs))


def per_pair_average(token_logps: torch.Tensor, pair_of_token: torch.Tensor, pairs: int) -> torch.Tensor:
    """Mean of token_logps per pair [pairs]; a pair without tokens has no average, and would make the loss NaN."""
    counts = torch.bincount(pair_of_token, minlength=pairs)
    check_counts(counts, "pairs")
    sums = token_logps.new_zeros(pairs).index_add(0, pair_of_token, token_logps)
    return sums / counts.to(sums.dtype)


def pair_lengths(targets: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """Labelled tokens of each pair [pairs] in one side's targets of a packed batch."""
    keep = targets != IGNORE_INDEX
    return torch.bincount(pair_index[keep], minlength=int(pair_index.max()) + 1)


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype,
                          pair_index: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [rows, 1, T, T] mask: a query attends to earlier keys of its own pair's prompt or of its
    own segment (pair_index None: one pair per row).

    Padding keys are masked for every query; a padding query attends only to itself, so no softmax
    row is all-masked (an all-masked row gives NaN, which would leak into gradients).
    """
    length = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (key != PAD) & (query != PAD) & ((key == PROMPT) | (key == query))
    if pair_index is not None:
        allowed &= pair_index[:, :, None] == pair_index[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def check_packable(model) -> None:
    """Raise UserError when a packed row would not compute what two unpacked rows compute."""
    lm = causal_lm(model)
    cfg = text_config(lm.config)
    kind = getattr(cfg, "model_type", type(lm).__name__)
    fix = "or set simpo.pack_prompt=false"
    kernel = getattr(cfg, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
    if kernel not in MASKED_KERNELS:
        raise UserError(f"simpo.pack_prompt=true needs an attention kernel that applies a custom mask "
                        f"('sdpa' or 'eager'), but this {kind} model uses '{kernel}': set "
                        f"model.attn_implementation=sdpa {fix}")
    window = getattr(cfg, "sliding_window", None)
    limited = sorted(set(getattr(cfg, "layer_types", None) or []) - {"full_attention"})
    if window or limited:
        what = f"sliding_window={window}" if window else f"layer types {limited}"
        raise UserError(f"simpo.pack_prompt=true cannot pack {kind}: its attention is restricted ({what}), "
                        f"and a custom mask replaces that restriction instead of adding to it; "
                        f"set simpo.pack_prompt=false")
    takes_positions = "position_ids" in inspect.signature(lm.get_decoder().forward).parameters
    if not takes_positions or getattr(cfg, "alibi", False):
        raise UserError(f"simpo.pack_prompt=true needs rotary/learned positions given by position_ids, which "
                        f"{kind} does not take; set simpo.pack_prompt=false")
