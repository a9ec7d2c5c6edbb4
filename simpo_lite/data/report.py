"""What the pipeline did with the data: rows read and kept, skips per rule, token lengths."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from simpo_lite.data.formats import RULES
from simpo_lite.data.tokenize import TOKENIZE_RULES
from simpo_lite.errors import UserError

ALL_RULES = {**RULES, **TOKENIZE_RULES}
FIRST_ROWS = 5  # row numbers kept per rule for the report


@dataclass
class SourceReport:
    """One loaded source (the training data, or a separate evaluation split/source)."""

    name: str
    role: str  # "train" or "eval"
    columns: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # kept pairs whose prompt was cut to data.max_prompt_length

    @classmethod
    def from_columns(cls, name: str, role: str, columns: str, rows: Sequence[int], drops: Sequence[str],
                     kinds: Sequence[str], truncated: Sequence[bool] = ()) -> "SourceReport":
        report = cls(name=name, role=role, columns=columns, rows_read=len(drops),
                     truncated=sum(bool(t) for t, d in zip(truncated, drops) if not d))
        for row, rule in zip(rows, drops):
            if rule:
                report.dropped[rule] = report.dropped.get(rule, 0) + 1
                if len(report.first_rows.setdefault(rule, [])) < FIRST_ROWS:
                    report.first_rows[rule].append(row)
        report.rows_kept = report.rows_read - sum(report.dropped.values())
        report.kinds = dict(Counter(k for k, d in zip(kinds, drops) if k and not d))  # of the rows kept
        return report

    @property
    def bad(self) -> int:
        return self.rows_read - self.rows_kept

    def drop_lines(self) -> list[str]:
        return [f"{rule}: {count} (rows {', '.join(map(str, self.first_rows[rule]))}"
                f"{', ...' if count > len(self.first_rows[rule]) else ''}) - {ALL_RULES.get(rule, rule)}"
                for rule, count in sorted(self.dropped.items(), key=lambda kv: -kv[1])]

    def check(self, max_bad_fraction: float) -> None:
        """Stop before training when too much of the source is unusable."""
        problem = self.too_many_bad(max_bad_fraction)
        if problem:
            raise UserError(problem)

    def too_many_bad(self, max_bad_fraction: float) -> Optional[str]:
        """Why training would stop on this source, with each rule's meaning; None when it would not."""
        causes = "; ".join(f"{rule} {count} (first rows {', '.join(map(str, self.first_rows[rule]))}: "
                           f"{ALL_RULES.get(rule, rule)})"
                           for rule, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        if self.rows_kept == 0:
            return (f"{self.role} data {self.name}: none of its {self.rows_read} rows is usable ({causes}); "
                    f"check the columns (data.columns) and lengths (data.max_length)")
        share = self.bad / self.rows_read
        if share > max_bad_fraction:
            return (f"{self.role} data {self.name}: {self.bad} of {self.rows_read} rows ({share:.0%}) are "
                    f"unusable ({causes}), more than data.max_bad_fraction={max_bad_fraction:g}; "
                    f"fix the data or raise data.max_bad_fraction")
        return None


def length_stats(values: Sequence[int]) -> Optional[dict[str, float]]:
    if len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"min": float(arr.min()), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def split_lengths(dataset) -> dict[str, Optional[dict[str, float]]]:
    """Token-length statistics of a prepared split, from its length columns."""
    prompt = np.asarray(dataset["prompt_length"], dtype=np.int64)
    chosen = np.asarray(dataset["chosen_length"], dtype=np.int64)
    rejected = np.asarray(dataset["rejected_length"], dtype=np.int64)
    return {"prompt": length_stats(prompt), "chosen response": length_stats(chosen - prompt),
            "rejected response": length_stats(rejected - prompt),
            "pair (longer sequence)": length_stats(np.maximum(chosen, rejected))}


@dataclass
class DataReport:
    sources: list[SourceReport]
    train_pairs: int
    eval_pairs: int
    eval_origin: str
    lengths: dict[str, dict[str, Optional[dict[str, float]]]] = field(default_factory=dict)

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.sources)

    @property
    def rows_kept(self) -> int:
        return sum(s.rows_kept for s in self.sources)

    @property
    def dropped(self) -> dict[str, int]:
        total: Counter = Counter()
        for source in self.sources:
            total.update(source.dropped)
        return dict(total)

    def summary(self) -> str:
        lines = []
        for s in self.sources:
            lines.append(f"{s.role} data {s.name}: {s.rows_read} rows read, {s.rows_kept} kept "
                         f"(columns {s.columns})")
            if s.truncated:
                lines.append(f"  prompt truncated to data.max_prompt_length: {s.truncated}")
            lines += [f"  format: {kind}: {count}" for kind, count in s.kinds.items()]
            lines += [f"  skipped {line}" for line in s.drop_lines()]
        lines.append(f"pairs: {self.train_pairs} train, {self.eval_pairs} eval ({self.eval_origin}); "
                     f"row numbers count from 0")
        for split, fields in self.lengths.items():
            for name, stats in fields.items():
                if stats:
                    lines.append(f"  {split} {name} tokens: min {stats['min']:.0f}, mean {stats['mean']:.1f}, "
                                 f"p95 {stats['p95']:.0f}, max {stats['max']:.0f}")
        return "\n".join(lines + [self.counts_line()])

    def counts_line(self) -> str:
        """The one line a run always prints after preparing its data (--quiet too)."""
        skipped = sum(s.bad for s in self.sources)
        truncated = sum(s.truncated for s in self.sources)
        rules = ", ".join(f"{rule} {n}" for rule, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        return (f"data: {self.train_pairs} train + {self.eval_pairs} eval pairs kept; skipped by rule: {skipped}"
                f"{f' ({rules})' if rules else ''}; prompt truncated to data.max_prompt_length: {truncated}")
