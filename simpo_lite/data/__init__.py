"""Preference data: every common format in, masked [chosen; rejected] token pairs out.

    prepared = build_datasets(cfg.data, tokenizer, seed)      # .train, .eval, .report
    collate = make_collator(tokenizer.pad_token_id, pack_prompt=False)   # PairCollator; True: PackedPairCollator
    batches = batch_indices(prepared.train["length"], batch_size, seed=seed, epoch=epoch)
    batch = collate([prepared.train[i] for i in batches[0]])
"""

from simpo_lite.data.batching import PairCollator, batch_indices, padding_fraction, padding_share
from simpo_lite.data.packing import PackedPairCollator, make_collator
from simpo_lite.data.pipeline import PreparedData, build_datasets
from simpo_lite.data.report import DataReport, SourceReport
from simpo_lite.data.tokenize import IGNORE_INDEX, PairTokenizer, ensure_pad_token

__all__ = ["build_datasets", "PreparedData", "DataReport", "SourceReport", "PairCollator", "PackedPairCollator",
           "make_collator", "batch_indices",
           "padding_fraction", "padding_share", "PairTokenizer", "ensure_pad_token", "IGNORE_INDEX"]
