"""Sequence log-probabilities computed only where the labels are, a chunk of tokens at a time.

The usual path (``model(...).logits`` -> log-softmax -> gather) materialises float32 logits of shape
[rows, length, vocab], the largest allocation of a QLoRA preference run. Here the decoder runs once to
its final hidden states, only positions whose next token is a label are kept, and those are projected
through the output head ``chunk_tokens`` at a time in float32 log-sum-exp. No chunk's [chunk, vocab]
logits outlive the chunk:

- A frozen plain ``nn.Linear`` head (the LoRA case: adapters leave ``lm_head`` alone by default, and
  tied embeddings are frozen too) goes through ``_FrozenHeadLogps``. A token's log-prob depends only
  on its own hidden state, so d logp / d hidden is a [tokens, hidden] tensor that is exact whatever
  the loss does later; it is computed next to the forward value, and backward only scales it. The
  head's matmul runs twice per token (value, gradient), as in an ordinary forward + backward.
- Any other head (LoRA-wrapped, trainable, quantized) goes through ``torch.utils.checkpoint`` per
  chunk: the logits are dropped after forward and recomputed in backward.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (``labels[t] == input_ids[t]``
on response tokens, -100 elsewhere); the shift happens here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of positions that carry no target (prompt, padding); the data side writes it


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor, average: bool = True, chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean (``average=True``) or sum of log p(label_t | prefix) over each row's labelled positions.

    Returns a float32 tensor [rows] (float64 for a float64 model). A row without any label raises:
    its average is undefined and would turn the whole loss into NaN.
    """
    lm = causal_lm(model)
    hidden, targets, keep = labelled_hidden_states(lm, input_ids, attention_mask, labels)
    token_logps = head_logps(lm, hidden[keep], targets[keep], chunk_tokens)
    return per_row(token_logps, keep, average)


def labelled_hidden_states(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [rows, length - 1, hidden], shifted targets, where they are labels): position t predicts target t."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    check_labelled(keep)
    # The last position predicts nothing, so the decoder never needs to see it (causal attention).
    mask = attention_mask[:, :-1] if attention_mask is not None else None
    return final_hidden_states(lm, input_ids[:, :-1], mask), targets, keep


def check_labelled(keep: torch.Tensor) -> None:
    """A row without any label has no average, and would turn the whole loss into NaN."""
    check_counts(keep.sum(-1), "rows")


def check_counts(counts: torch.Tensor, what: str) -> None:
    """Raise ValueError naming the `what` (rows, pairs) whose count of labelled tokens is 0."""
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"{what} {empty} have no response tokens (every label is {IGNORE_INDEX})")


def per_row(token_logps: torch.Tensor, keep: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean) per row of ``token_logps``, given in the row-major order of ``keep``'s True slots."""
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    sums = token_logps.new_zeros(keep.shape[0]).index_add(0, rows, token_logps)
    return sums / keep.sum(-1).to(sums.dtype) if average else sums


def concatenated_logps(model, batch: dict, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Average log-probs of a [chosen; rejected] batch of 2B rows in one forward, split at B."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a concatenated batch has 2 x pairs rows, got {rows}")
    logps = sequence_logps(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                           average=True, chunk_tokens=chunk_tokens)
    return logps[: rows // 2], logps[rows // 2:]


def causal_lm(model):
    """The ``*ForCausalLM`` module: a PEFT wrapper is looked through (its LoRA layers stay in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_hidden_states(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        **extra) -> torch.Tensor:
    """[rows, length, hidden] after the final norm, without ever calling the output head. `extra`
    (position_ids, segment_layout) goes to the decoder only when given: the unpacked path keeps the
    model's own default positions."""
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def text_config(config):
    """The language model's part of a Hugging Face config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(lm) -> tuple[float, float | None]:
    """(scale, soft cap) that the model applies to ``lm_head`` outputs: logits = cap * tanh(scale * z / cap).

    Gemma-2/3 soft-cap their logits; Cohere multiplies them by ``logit_scale``; Granite divides them by
    ``logits_scaling``. ``check_logit_head`` catches a model doing something else.
    """
    cfg = text_config(lm.config)
    kind = getattr(cfg, "model_type", "") or ""
    scale = 1.0
    if kind.startswith("granite") and getattr(cfg, "logits_scaling", None):
        scale = 1.0 / float(cfg.logits_scaling)
    elif kind.startswith("cohere") and hasattr(lm, "logit_scale"):
        scale = float(lm.logit_scale)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def head_logps(lm, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` [tokens, hidden_size], ``chunk_tokens`` rows at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    head = lm.get_output_embeddings()
    scale, cap = logit_transform(lm)
    if type(head) is torch.nn.Linear and not (torch.is_grad_enabled() and _trainable(head)):
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, scale, cap, chunk_tokens)
    pieces = []
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, h, t, scale, cap, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t, scale, cap))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=_acc_dtype(hidden))


def check_logit_head(model, input_ids: torch.Tensor, atol: float = 0.1) -> float:
    """Compare this module's log-probs with the model's own ``forward`` logits on a few tokens.

    Returns the largest absolute difference (nats); raises ValueError above ``atol``, which means the
    model transforms its logits in a way ``logit_transform`` does not know. Cheap: every run calls it once
    (run_setup.check_log_probs).
    """
    ids = input_ids[:1, :16]
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        reference = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        lm = causal_lm(model)
        # The decoder sees the very same input as the model's own forward: a bf16 CPU GEMM rounds
        # differently for 15 rows than for 16 (measured 0.2 nats after 30 layers on an AMD EPYC), and
        # only the head may differ here.
        hidden = final_hidden_states(lm, ids, None)[0, :-1]
        ours = head_logps(lm, hidden, ids[0, 1:], chunk_tokens=1024).float()
    diff = (ours - reference[0]).abs().max().item()
    if diff > atol:
        raise ValueError(f"log-probs differ from the model's own logits by {diff:.3g} nats: "
                         f"{type(lm).__name__} transforms its logits in a way simpo_lite does not apply")
    return diff


def _trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision activations; float64 stays float64 (tests compare at that precision)."""
    return torch.promote_types(t.dtype, torch.float32)


def _transform(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    if scale != 1.0:
        z = z * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z


def _chunk_logps(head, hidden, targets, scale, cap):
    logits = _transform(head(hidden).to(_acc_dtype(hidden)), scale, cap)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """log-softmax(head(hidden))[target] for a frozen Linear head, with d/d hidden made in the same pass.

    Per chunk: z = hidden @ W^T + b, logits = transform(z), logp = logits[t] - logsumexp(logits), and
    d logp / d z = (onehot(t) - softmax(logits)) * transform'(z), turned into d logp / d hidden by one
    matmul with W. backward only scales that by the incoming gradient, so nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, cap, chunk_tokens):
        need_grad = ctx.needs_input_grad[0]
        out = torch.empty(hidden.shape[0], dtype=_acc_dtype(hidden), device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            out[sl], chunk_grad = _logps_and_grad(hidden[sl], weight, bias, targets[sl], scale, cap, need_grad)
            if need_grad:
                grad[sl] = chunk_grad
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(-1).to(grad.dtype), None, None, None, None, None, None


def _logps_and_grad(hidden, weight, bias, targets, scale, cap, need_grad):
    """One chunk's log-probs and, if asked, d logp / d hidden, in a single [chunk, vocab] buffer
    (two with a soft cap, whose derivative needs tanh kept): the log-sum-exp is done in place
    instead of by torch.logsumexp, which would allocate a second one."""
    t = targets.unsqueeze(-1)
    logits = F.linear(hidden, weight, bias).to(_acc_dtype(hidden))
    if scale != 1.0:
        logits.mul_(scale)
    squashed = None
    if cap is not None:
        squashed = logits.div_(cap).tanh_()
        logits = squashed * cap
    target_logits = logits.gather(-1, t)
    peak = logits.amax(-1, keepdim=True)
    total = logits.sub_(peak).exp_().sum(-1, keepdim=True)  # logits now holds exp(logits - peak)
    logps = (target_logits - peak - total.log()).squeeze(-1)
    if not need_grad:
        return logps, None
    g = logits.div_(total).neg_()  # -softmax
    g.scatter_add_(-1, t, torch.ones_like(t, dtype=g.dtype))
    if squashed is not None:
        g.mul_(squashed.mul_(squashed).neg_().add_(1))
    if scale != 1.0:
        g.mul_(scale)
    return logps, (g.to(weight.dtype) @ weight).to(hidden.dtype)
