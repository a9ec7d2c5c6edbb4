"""Batches with one row per pair, [prompt | chosen | rejected], so the decoder runs the prompt once.

The unpacked batch (PairCollator) repeats the prompt in the chosen and in the rejected row. Here the
rejected response follows the chosen one in the same row, and three things keep every token's view
exactly what it is in its own unpacked row:

- position ids restart after the prompt for the rejected response (rejected token j sits at p + j);
- segment ids (PROMPT, CHOSEN, REJECTED, PAD) from which the model side builds an attention mask in
  which rejected tokens see the prompt and earlier rejected tokens, never the chosen ones;
- targets aligned to the position that predicts them: the first rejected token is predicted from the
  last prompt position, the same one that predicts the first chosen token, so one position can carry
  a chosen and a rejected target; hence two tensors, chosen_targets and rejected_targets.

With simpo.pack_tokens, several such pairs share a row (first-fit decreasing up to that many tokens),
so rows of different lengths do not pad each other out: pair_index says which pair each token belongs
to, the mask keeps pairs apart and the log-probs are reduced per pair, in the batch's pair order. A
training micro-batch is then counted in tokens, not pairs (token_budget_batches): train.micro_batch_size
rows of up to pack_tokens tokens, as many pairs as fit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from simpo_lite.data.batching import PairCollator, _Collator
from simpo_lite.logprobs import IGNORE_INDEX
from simpo_lite.errors import UserError

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
# Waiting pairs a token-counted micro-batch looks through to fill its rows: enough to fill them to
# about 99% on mixed lengths, few enough that no pair moves far from its shuffled place.
LOOKAHEAD = 64


def make_collator(pad_token_id: Optional[int], pack_prompt: bool, pack_tokens: int = 0):
    """The collator simpo.pack_prompt (and simpo.pack_tokens, which config checks needs pack_prompt) ask for."""
    return PackedPairCollator(pad_token_id, pack_tokens) if pack_prompt else PairCollator(pad_token_id)


def prompt_length(feature: dict) -> int:
    """Tokens before the first label, which must be the same tokens on both sides."""
    lengths = []
    for side in ("chosen", "rejected"):
        labels = feature[f"{side}_labels"]
        lengths.append(next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels)))
    p = lengths[0]
    if lengths[1] != p or feature["chosen_input_ids"][:p] != feature["rejected_input_ids"][:p] or p == 0:
        raise UserError("simpo.pack_prompt needs chosen and rejected to start with the same, non-empty, "
                        f"unlabelled prompt; got prompt lengths {lengths} or different prompt tokens: "
                        "set simpo.pack_prompt=false")
    return p


def pack_pair(feature: dict) -> dict[str, list[int]]:
    """One packed row as lists: input_ids, position_ids, segment_ids, chosen_targets, rejected_targets."""
    p = prompt_length(feature)
    chosen_ids, chosen_labels = feature["chosen_input_ids"], feature["chosen_labels"]
    rejected_ids, rejected_labels = feature["rejected_input_ids"], feature["rejected_labels"]
    c, r = len(chosen_ids) - p, len(rejected_ids) - p
    n = p + c + r
    # Chosen keeps its unpacked indices, so its shifted labels line up as they are.
    chosen_targets = chosen_labels[1:] + [IGNORE_INDEX] * (n - len(chosen_labels) + 1)
    # Rejected index s of its unpacked row sits at s (prompt) or s + c (response) in the packed row.
    rejected_targets = [IGNORE_INDEX] * n
    for s, target in enumerate(rejected_labels[1:]):
        rejected_targets[s if s < p else s + c] = target
    return {"input_ids": chosen_ids + rejected_ids[p:],
            "position_ids": list(range(p + c)) + list(range(p, p + r)),
            "segment_ids": [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r,
            "chosen_targets": chosen_targets,
            "rejected_targets": rejected_targets}


def fill_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Pair indices per row: first-fit decreasing, at most `budget` tokens a row (a longer pair gets
    a row of its own); pairs keep their batch order inside a row."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(budget - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return [sorted(row) for row in rows]


def token_budget_batches(lengths: Sequence[int], rows: int, budget: int, *, seed: int = 0,
                         epoch: int = 0) -> list[list[int]]:
    """One epoch's micro-batches of pair indices counted in tokens (simpo.pack_tokens).

    Pairs come in a shuffled order. A micro-batch opens with the first pair waiting, then takes each of
    the next LOOKAHEAD waiting pairs that fill_rows (the collator's own packing) still fits into at most
    `rows` rows of `budget` tokens (a pair over the budget goes alone); the rest wait for the next one.
    The micro-batch with the most token slots goes first, so running out of memory happens at step 1.
    Same arguments, same batches."""
    if rows < 1 or budget < 1:
        raise ValueError("rows and budget must be >= 1")
    waiting = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    batches = []
    while waiting:
        batch, passed = [waiting[0]], []
        for i in waiting[1:LOOKAHEAD + 1]:
            if len(fill_rows([lengths[j] for j in batch + [i]], budget)) <= rows:
                batch.append(i)
            else:
                passed.append(i)
        waiting = passed + waiting[LOOKAHEAD + 1:]
        batches.append(batch)
    if batches:
        fullest = max(range(len(batches)), key=lambda b: batch_slots([lengths[i] for i in batches[b]], budget))
        batches.insert(0, batches.pop(fullest))
    return batches


def batch_slots(lengths: Sequence[int], budget: int) -> int:
    """Token slots (rows x the longest row) of the batch the collator packs pairs of these lengths into."""
    rows = fill_rows(lengths, budget)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


class PackedPairCollator(_Collator):
    """Pack each pair into one row (or, with pack_tokens, several pairs into rows of up to pack_tokens
    tokens) and right-pad the rows to one length.

    Returns LongTensors of shape [rows, T]: input_ids, attention_mask (1 on real tokens, for counting
    and for readers; the model side masks from segment_ids and pair_index), position_ids, segment_ids
    (PAD on padding), pair_index (the pair's index in `features`, -1 on padding), chosen_targets and
    rejected_targets (IGNORE_INDEX where a position predicts nothing for that side).
    """

    FILL = {"input_ids": None, "attention_mask": 0, "position_ids": 0, "segment_ids": PAD, "pair_index": -1,
            "chosen_targets": IGNORE_INDEX, "rejected_targets": IGNORE_INDEX}

    def __init__(self, pad_token_id: Optional[int], pack_tokens: int = 0):
        super().__init__(pad_token_id)
        self.pack_tokens = pack_tokens

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        pairs = [pack_pair(f) for f in features]
        for i, pair in enumerate(pairs):
            pair["attention_mask"] = [1] * len(pair["input_ids"])
            pair["pair_index"] = [i] * len(pair["input_ids"])
        lengths = [len(pair["input_ids"]) for pair in pairs]
        groups = fill_rows(lengths, self.pack_tokens) if self.pack_tokens else [[i] for i in range(len(pairs))]
        rows = [{key: [v for i in group for v in pairs[i][key]] for key in self.FILL} for group in groups]
        length = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key, fill in self.FILL.items():
            fill = self.pad_token_id if fill is None else fill
            batch[key] = torch.tensor([row[key] + [fill] * (length - len(row[key])) for row in rows],
                                      dtype=torch.long)
        return batch
