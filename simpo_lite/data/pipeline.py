"""build_datasets: config in, tokenized train/eval splits and a report out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from datasets import Dataset

from simpo_lite.data.formats import resolve_columns
from simpo_lite.data.process import FEATURES, RowProcessor
from simpo_lite.data.report import DataReport, SourceReport, split_lengths
from simpo_lite.data.sources import Source, cache_guard, load_source
from simpo_lite.data.tokenize import PairTokenizer, ensure_pad_token
from simpo_lite.errors import UserError


@dataclass
class PreparedData:
    """Tokenized splits. Besides the four token columns each row has `row` (its number in the source),
    `prompt_length`, `chosen_length`, `rejected_length` and `length` (the longer of the two)."""

    train: Dataset
    eval: Optional[Dataset]
    report: DataReport


def _tokenize(source: Source, data_cfg, pair_tokenizer: PairTokenizer, role: str) -> tuple[Dataset, SourceReport]:
    if source.dataset.num_rows == 0:
        raise UserError(f"{role} data {source.name} has no rows: check data.source and the split settings")
    columns = resolve_columns(source.columns, data_cfg.columns, source.name)
    processor = RowProcessor(pair_tokenizer, columns, data_cfg.system_prompt)
    num_proc = min(data_cfg.num_proc, source.dataset.num_rows)
    with cache_guard():  # datasets writes the tokenized rows next to a file source's cache
        mapped = source.dataset.map(processor, batched=True, with_indices=True, features=FEATURES,
                                    remove_columns=source.dataset.column_names,
                                    num_proc=num_proc if num_proc > 1 else None,
                                    desc=f"Tokenizing {role} data")
    drops = mapped["drop"]
    report = SourceReport.from_columns(source.name, role, columns.describe(), mapped["row"], drops, mapped["kind"],
                                       mapped["truncated"])
    report.check(data_cfg.max_bad_fraction)
    kept = mapped.select([i for i, d in enumerate(drops) if not d])
    return kept.remove_columns(["drop", "kind", "truncated"]), report


def _subset(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """At most `limit` rows, a seeded random choice kept in source order."""
    if limit is None or dataset.num_rows <= limit:
        return dataset
    chosen = np.sort(np.random.default_rng(seed).permutation(dataset.num_rows)[:limit])
    return dataset.select(chosen.tolist())


def _hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """About a seeded `fraction` of the rows held out, whole prompts at a time: a prompt with pairs on both
    sides would be scored, and answered by generation health, after the model trained on it. Prompts are
    drawn in a seeded order, each taken while the held-out rows stay within the fraction (one prompt at
    least, the smallest, when every prompt has more rows than that; never all)."""
    n = dataset.num_rows
    if fraction >= 1:  # eval or generate on every pair of a file
        return dataset.select([]), dataset
    groups = prompt_groups(dataset["question"])
    if fraction <= 0 or len(groups) < 2:
        return dataset, None
    wanted = min(max(int(round(n * fraction)), 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    held = 0
    for group in np.random.default_rng(seed).permutation(len(groups)):
        if held + len(groups[group]) <= wanted:
            mask[groups[group]] = True
            held += len(groups[group])
    if not held:
        mask[min(groups, key=len)] = True
    return dataset.select(np.flatnonzero(~mask).tolist()), dataset.select(np.flatnonzero(mask).tolist())


def prompt_groups(questions: list[str]) -> list[list[int]]:
    """Row numbers by prompt (its last user message), in order of first appearance; a row without a
    question is a group of its own. With every prompt different, one group a row, in row order."""
    groups: list[list[int]] = []
    where: dict[str, int] = {}
    for row, question in enumerate(questions):
        if question and question in where:
            groups[where[question]].append(row)
            continue
        if question:
            where[question] = len(groups)
        groups.append([row])
    return groups


def build_datasets(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Load, validate, template, mask and truncate the data of `data_cfg` (a config.DataConfig).

    Raises UserError before any training when a source cannot be loaded or too many rows are unusable.
    """
    ensure_pad_token(tokenizer)
    pairs = PairTokenizer(tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation_mode)
    train_source = load_source(data_cfg.source, data_cfg.config_name, data_cfg.split)
    train, train_report = _tokenize(train_source, data_cfg, pairs, "train")
    reports = [train_report]
    if data_cfg.eval_source or data_cfg.eval_split:
        same = data_cfg.eval_source in (None, data_cfg.source)  # config_name belongs to data.source
        eval_source = load_source(data_cfg.eval_source or data_cfg.source, data_cfg.config_name if same else None,
                                  data_cfg.eval_split or data_cfg.split,
                                  setting="data.eval_source" if data_cfg.eval_source else "data.source")
        evaluation, eval_report = _tokenize(eval_source, data_cfg, pairs, "eval")
        reports.append(eval_report)
        origin = f"from {eval_source.name}"
    else:
        train, evaluation = _hold_out(train, data_cfg.eval_fraction, seed)
        origin = ("every row" if data_cfg.eval_fraction >= 1 else "no evaluation data" if data_cfg.eval_fraction <= 0
                  else "no evaluation data: a single prompt, which cannot be held out without training on it "
                       "(give data.eval_source)" if evaluation is None
                  else f"held out {data_cfg.eval_fraction:g} of the training rows, whole prompts, with seed {seed}")
    train = _subset(train, data_cfg.max_train_pairs, seed)
    if evaluation is not None:
        evaluation = _subset(evaluation, data_cfg.eval_max_pairs, seed)
    report = DataReport(sources=reports, train_pairs=train.num_rows,
                        eval_pairs=evaluation.num_rows if evaluation is not None else 0, eval_origin=origin)
    report.lengths["train"] = split_lengths(train)
    if evaluation is not None:
        report.lengths["eval"] = split_lengths(evaluation)
    return PreparedData(train=train, eval=evaluation, report=report)
