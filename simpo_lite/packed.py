"""Log-probs of packed [prompt | chosen | rejected] rows (simpo.pack_prompt), equal to the unpacked ones.

The decoder sees each prompt once. What makes a packed row compute the same numbers as two unpacked
rows is attention by segments (rejected tokens see the prompt and each other, never the chosen ones;
simpo_lite.segments) and position ids that restart after the prompt (simpo_lite.data.packing builds
them). Models whose layers restrict or transform attention further (sliding windows, soft-capped
scores) or build their own attention (flex attention) would compute something else: refused.
"""

from __future__ import annotations

import inspect

import torch

from simpo_lite.errors import UserError
from simpo_lite.logprobs import IGNORE_INDEX, causal_lm, check_counts, final_hidden_states, head_logps, text_config
from simpo_lite.segments import PREFIX, SEGMENT_KERNELS, SegmentLayout, check_layout_used, use_segment_attention


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
    use_segment_attention(lm)
    layout = SegmentLayout.from_batch(batch["segment_ids"][:, :-1], pair_index)
    input_ids = batch["input_ids"][:, :-1]
    # Segment attention needs no mask. Given none, transformers would infer one from the restarting
    # position ids and build it at [rows, T, T]; an all-ones mask lets it skip that.
    hidden = final_hidden_states(lm, input_ids, torch.ones_like(input_ids), position_ids=batch["position_ids"][:, :-1],
                                 segment_layout=layout)
    check_layout_used(layout, text_config(lm.config).num_hidden_layers, model_kind(lm))
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


def check_packable(model) -> None:
    """Raise UserError when a packed row would not compute what two unpacked rows compute."""
    lm = causal_lm(model)
    cfg = text_config(lm.config)
    kind = model_kind(lm)
    kernel = (getattr(cfg, "_attn_implementation", None) or "sdpa").removeprefix(PREFIX)
    if kernel not in SEGMENT_KERNELS:
        raise UserError(f"simpo.pack_prompt=true computes attention segment by segment in place of the "
                        f"model's kernel ({', '.join(SEGMENT_KERNELS)}), but this {kind} model uses "
                        f"'{kernel}': set model.attn_implementation=sdpa or set simpo.pack_prompt=false")
    window = getattr(cfg, "sliding_window", None)
    limited = sorted(set(getattr(cfg, "layer_types", None) or []) - {"full_attention"})
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if window or limited or softcap:
        what = (f"sliding_window={window}" if window else f"layer types {limited}" if limited
                else f"attn_logit_softcapping={softcap}")
        raise UserError(f"simpo.pack_prompt=true cannot pack {kind}: its attention is restricted ({what}), "
                        f"which attention by segments does not apply; "
                        f"set simpo.pack_prompt=false")
    takes_positions = "position_ids" in inspect.signature(lm.get_decoder().forward).parameters
    if not takes_positions or getattr(cfg, "alibi", False):
        raise UserError(f"simpo.pack_prompt=true needs rotary/learned positions given by position_ids, which "
                        f"{kind} does not take; set simpo.pack_prompt=false")


def model_kind(lm) -> str:
    """The model type that refusals name (llama, gemma2, ...)."""
    return getattr(text_config(lm.config), "model_type", type(lm).__name__)
