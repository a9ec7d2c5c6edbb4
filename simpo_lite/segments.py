"""Attention over packed rows, one segment at a time, so no work goes to tokens that never see each other.

A packed row (simpo_lite.data.packing) holds [prompt | chosen | rejected] for one or more pairs. Its
queries fall into segments with simple views of the row:

- a pair's prompt and chosen tokens attend causally to each other, as in an unpacked chosen row;
- its rejected tokens attend to the prompt and causally to the earlier rejected tokens, as in an
  unpacked rejected row.

A dense attention kernel given a 4D mask computes every query against every key of the row and throws
most of it away: with 8 pairs in a 2,048-token row, well over nine tenths of the scores. Here each segment
is its own small causal attention over its own keys (the "variable-length" form of flash-attention),
aligned bottom-right: the last query sees every key, so a rejected query sees the whole prompt. Two
kernels compute it: flash-attention's flash_attn_varlen_func, when the model was loaded with
model.attn_implementation=flash_attention_2 on a CUDA device; otherwise PyTorch's SDPA on each segment
in turn. Padding queries attend to nothing and output zeros; no real token sees them.

The model's own attention function is replaced by one that computes segments when the forward is given
a SegmentLayout (the ``segment_layout`` keyword, which transformers passes through the decoder layers
to attention, and which gradient checkpointing keeps for the recomputation) and otherwise calls the
model's original kernel, so generation and unpacked forwards are unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from simpo_lite.data.packing import CHOSEN, PROMPT, REJECTED
from simpo_lite.errors import UserError
from simpo_lite.logprobs import text_config

PREFIX = "simpo_segments+"   # attention implementation name: PREFIX + the model's original kernel
# The model's own kernels that segment attention stands in for (flash-attention 2 for its varlen kernel).
SEGMENT_KERNELS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class SegmentLayout:
    """Where the segments of a packed batch [rows, length] lie, flattened row-major.

    q_index: positions of all real (non-padding) queries, segment after segment; cu_q: where each
    segment's queries start and end in q_index (len segments + 1); k_index / cu_k: the same for the keys
    each segment attends to. ``calls`` counts the attention calls that used the layout, so a model that
    drops the keyword on the way to attention is caught instead of attending across segments.
    """
    rows: int
    length: int
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: list[int]
    cu_k: list[int]
    calls: int = 0

    @classmethod
    def from_batch(cls, segment_ids: torch.Tensor, pair_index: torch.Tensor) -> "SegmentLayout":
        """The layout of a packed batch's [rows, length] segment_ids and pair_index (padding: data.packing.PAD, -1)."""
        rows, length = segment_ids.shape
        segments, pairs = segment_ids.cpu().numpy(), pair_index.cpu().numpy()
        q_parts, k_parts, cu_q, cu_k = [], [], [0], [0]
        for r in range(rows):
            base = r * length
            for pair in np.unique(pairs[r][pairs[r] >= 0]):
                where = np.flatnonzero(pairs[r] == pair)
                kinds = segments[r][where]
                prompt, chosen, rejected = (base + where[kinds == kind] for kind in (PROMPT, CHOSEN, REJECTED))
                # The row's last column is dropped before the forward, so a pair may end without a
                # rejected (or even a chosen) query left: its segment is then empty and skipped.
                for queries, keys in ((np.concatenate([prompt, chosen]), None), (rejected, prompt)):
                    if len(queries):
                        keys = queries if keys is None else np.concatenate([keys, queries])
                        q_parts.append(queries)
                        k_parts.append(keys)
                        cu_q.append(cu_q[-1] + len(queries))
                        cu_k.append(cu_k[-1] + len(keys))
        device = segment_ids.device
        index = lambda parts: torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64), device=device)
        return cls(rows, length, index(q_parts), index(k_parts), cu_q, cu_k)


def use_segment_attention(lm) -> None:
    """Route a *ForCausalLM's attention through segment_attention (idempotent); its original kernel
    keeps serving every forward without a layout."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = text_config(lm.config)
    original = config._attn_implementation or "sdpa"
    if original.startswith(PREFIX):
        return
    name = PREFIX + original
    if name not in AttentionInterface._global_mapping:
        def attention(module, query, key, value, attention_mask, segment_layout=None, **kwargs):
            if segment_layout is None:
                kernel = own_eager_attention(module) if original == "eager" else AttentionInterface()[original]
                with implementation_named(module.config, original):
                    return kernel(module, query, key, value, attention_mask, **kwargs)
            return segment_attention(module, query, key, value, segment_layout, original, **kwargs)
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    config._attn_implementation = name


@contextlib.contextmanager
def implementation_named(config, name: str):
    """The config's attention implementation read as `name` for one call: transformers' flash-attention
    function looks its kernel up by that name, and would take ours for a Hub kernel repository."""
    ours = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = ours


def own_eager_attention(module):
    """The eager attention function of the module's own modeling file, which 'eager' means for it."""
    return sys.modules[type(module).__module__].eager_attention_forward


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SegmentLayout,
                      original: str, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [rows, heads, length, dim], key and value
    [rows, kv_heads, length, dim] in, output [rows, length, heads, dim] out (no weights)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("segment attention applies neither soft-capped scores nor sliding windows")
    rows, heads, length, dim = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)
    q = flat(query).index_select(0, layout.q_index)
    k, v = (flat(x).index_select(0, layout.k_index) for x in (key, value))
    kernel = flash_varlen if original == "flash_attention_2" and query.is_cuda else sdpa_varlen
    out = kernel(q, k, v, layout.cu_q, layout.cu_k, scaling, dropout)
    layout.calls += 1
    full = out.new_zeros(rows * length, heads, dim).index_copy(0, layout.q_index, out)
    return full.view(rows, length, heads, dim), None


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
                scale: float | None, dropout: float) -> torch.Tensor:
    """Causal attention per segment, aligned bottom-right, on [tokens, heads, dim] tensors: what
    flash_attn_varlen_func(causal=True) computes, with PyTorch's SDPA one segment at a time."""
    pieces = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x, a, b in
                      ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
        lq, lk = qs.shape[2], ks.shape[2]
        # Equal lengths: the plain causal kernel. More keys than queries (a rejected segment): every
        # query also sees the whole prompt in front of it.
        mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=lq == lk, dropout_p=dropout,
                                             scale=scale, enable_gqa=ks.shape[1] != qs.shape[1])
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else q.new_zeros(q.shape)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
                 scale: float | None, dropout: float) -> torch.Tensor:
    """The same attention with flash-attention 2's variable-length kernel (causal is bottom-right
    aligned there since 2.1)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise UserError("model.attn_implementation=flash_attention_2 needs the flash-attn package: "
                        "pip install flash-attn, or set model.attn_implementation=sdpa") from err
    as_cu = lambda cu: torch.tensor(cu, dtype=torch.int32, device=q.device)
    lengths = lambda cu: max(b - a for a, b in zip(cu, cu[1:])) if len(cu) > 1 else 0
    # The kernel takes only 16-bit inputs; fp32 ones come from a model run without autocast
    # (model.frozen_dtype=fp32), as in transformers' own flash-attention path.
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else flash_dtype()
    out = flash_attn_varlen_func(q.to(half), k.to(half), v.to(half), as_cu(cu_q), as_cu(cu_k), lengths(cu_q),
                                 lengths(cu_k), dropout_p=dropout, softmax_scale=scale, causal=True)
    return out.to(q.dtype)


def flash_dtype() -> torch.dtype:
    """The 16-bit type flash-attention runs fp32 inputs in: autocast's, else bf16 where the GPU has it."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_layout_used(layout: SegmentLayout, layers: int, kind: str) -> None:
    """Raise UserError when fewer attention calls than decoder layers used the layout: the model did not
    pass it on, so some layer attended across pairs."""
    if layout.calls < layers:
        raise UserError(f"simpo.pack_prompt=true cannot pack {kind}: only {layout.calls} of its {layers} "
                        f"attention layers took the packed layout; set simpo.pack_prompt=false")
