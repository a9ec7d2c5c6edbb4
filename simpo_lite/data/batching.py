"""Batches for one concatenated chosen/rejected forward pass, and a length-grouped batch order."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from simpo_lite.logprobs import IGNORE_INDEX

MEGABATCH = 50  # batches per length-sorted window: enough to cut padding, small enough to stay random


class _Collator:
    """A collator pads with the tokenizer's pad id; it only fills masked slots, so any id works when there is none."""

    def __init__(self, pad_token_id: Optional[int]):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)


class PairCollator(_Collator):
    """Stack [chosen; rejected] rows, right-padded to one length.

    Returns LongTensors input_ids, attention_mask and labels of shape [2B, L]: rows 0..B-1 chosen,
    B..2B-1 the rejected responses of the same pairs. Labels are aligned with input_ids (-100 on the
    prompt and padding); the log-prob code shifts them itself.
    """

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        length = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.full((len(ids), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), length), dtype=torch.long),
            "labels": torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            n = len(row_ids)
            batch["input_ids"][i, :n] = torch.as_tensor(row_ids, dtype=torch.long)
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.as_tensor(row_labels, dtype=torch.long)
        return batch


def batch_indices(lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, group_by_length: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Deterministic batches of dataset indices for one epoch (same arguments, same batches).

    With group_by_length, indices are shuffled, cut into windows of MEGABATCH batches and sorted by
    length inside each window, so a batch holds pairs of similar length; the batch order is then
    shuffled and the batch with the longest pair goes first, so running out of memory happens at step 1.
    Without shuffle (evaluation) the whole set is sorted by length.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        window = batch_size * MEGABATCH if shuffle else max(n, 1)
        # A stable sort on the negated length keeps ties in shuffled (or original) order.
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, n, window))]) if n else order
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and group_by_length and batches:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b]].max())
        batches.insert(0, batches.pop(longest))
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], chosen_lengths: Sequence[int],
                     rejected_lengths: Optional[Sequence[int]] = None) -> float:
    """Share of padded slots in the [2B, L] tensors PairCollator builds for these batches.

    Without rejected_lengths, each index is one row (e.g. pass a prepared split's "length" column
    to estimate a single-sequence batch).
    """
    chosen = np.asarray(chosen_lengths, dtype=np.int64)
    rejected = None if rejected_lengths is None else np.asarray(rejected_lengths, dtype=np.int64)
    real = slots = 0
    for batch in batches:
        rows = [chosen[batch]] if rejected is None else [chosen[batch], rejected[batch]]
        longest = max(int(r.max()) for r in rows) if len(batch) else 0
        real += sum(int(r.sum()) for r in rows)
        slots += longest * len(batch) * len(rows)
    return 1.0 - real / slots if slots else 0.0


def padding_share(batch: dict) -> float:
    """Share of a collated batch's token slots that are padding (either collator: attention_mask is 0 there)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0
