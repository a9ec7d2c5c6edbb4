"""The `datasets.map` step: raw rows in, masked token pairs (or the reason a row is skipped) out.

Runs batched so the fast tokenizer encodes many texts per call; `datasets` caches the result next to
file-backed sources (keyed by this object's settings and tokenizer) and can spread it over num_proc.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional

from datasets import Features, List, Value
from jinja2.exceptions import TemplateError

from simpo_lite.data.formats import Columns, Pair, RowProblem, normalise
from simpo_lite.data.tokenize import TEMPLATE_ERROR, TOO_LONG, PairTokenizer

RAW_JSON = "__raw_json__"  # single column of a source whose rows are kept as JSON text (see sources.py)
TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
FEATURES = Features({
    "row": Value("int64"),
    "drop": Value("string"),
    "kind": Value("string"),
    "truncated": Value("bool"),  # the prompt was cut to data.max_prompt_length to fit data.max_length
    **{name: List(Value("int32")) for name in TOKEN_COLUMNS},
    "prompt_length": Value("int32"),
    "chosen_length": Value("int32"),
    "rejected_length": Value("int32"),
    "length": Value("int32"),
    "question": Value("string"),  # the prompt's last user message, for what people read (samples.jsonl)
})


class _Pending(NamedTuple):
    slot: int                        # position in the batch output
    row: int                         # row number in the source
    kind: str
    texts: tuple[str, str, str]      # prompt, chosen, rejected
    question: str                    # the last user message
    templated: bool                  # responses cut from the chat template (else raw text + EOS)


def _dropped(row: int, rule: str, kind: str = "") -> dict:
    return {"row": row, "drop": rule, "kind": kind, "truncated": False, **{name: [] for name in TOKEN_COLUMNS},
            "prompt_length": 0, "chosen_length": 0, "rejected_length": 0, "length": 0, "question": ""}


def _question(pair: Pair) -> str:
    users = [m["content"] for m in pair.messages if m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


class RowProcessor:
    """Batched map function: one output row per source row; a skipped row carries its rule in `drop`."""

    def __init__(self, pair_tokenizer: PairTokenizer, columns: Columns, system_prompt: Optional[str]):
        self.pairs = pair_tokenizer
        self.columns = columns
        self.system_prompt = system_prompt

    def _texts(self, pair: Pair) -> tuple[str, Optional[str], Optional[str]]:
        prompt = self.pairs.prompt_text(pair.messages)
        return (prompt, self.pairs.response_text(pair.messages, prompt, pair.chosen),
                self.pairs.response_text(pair.messages, prompt, pair.rejected))

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*batch.values())]
        out: list[Optional[dict]] = []
        pending: list[_Pending] = []  # rows that passed the checks, tokenized together below
        for index, row in zip(indices, rows):
            if RAW_JSON in row:
                row = json.loads(row[RAW_JSON])
            try:
                pair = normalise(row, self.columns, self.system_prompt)
                prompt, chosen, rejected = self._texts(pair)
            except RowProblem as problem:
                out.append(_dropped(index, problem.rule))
                continue
            except TemplateError:  # raised by templates for conversations they reject
                out.append(_dropped(index, TEMPLATE_ERROR))
                continue
            templated = chosen is not None and rejected is not None
            if not templated:
                chosen, rejected = pair.chosen, pair.rejected
            out.append(None)
            pending.append(_Pending(len(out) - 1, index, pair.kind, (prompt, chosen, rejected), _question(pair),
                                    templated))
        self._tokenize(pending, out)
        return {name: [item[name] for item in out] for name in FEATURES}

    def _tokenize(self, pending: list["_Pending"], out: list) -> None:
        encoded = self.pairs.encode([text for item in pending for text in item.texts])
        for n, item in enumerate(pending):
            prompt, chosen, rejected = encoded[3 * n: 3 * n + 3]
            prompt = self.pairs.finish_prompt(prompt)
            chosen = self.pairs.finish_response(chosen, item.templated)
            rejected = self.pairs.finish_response(rejected, item.templated)
            fitted = self.pairs.fit(prompt, chosen, rejected)
            index = item.row
            if fitted is None:
                out[item.slot] = _dropped(index, TOO_LONG, item.kind)
                continue
            chosen_ids, chosen_labels = self.pairs.join(fitted, chosen)
            rejected_ids, rejected_labels = self.pairs.join(fitted, rejected)
            out[item.slot] = {"row": index, "drop": "", "kind": item.kind, "truncated": len(fitted) < len(prompt),
                         "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                         "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels,
                         "prompt_length": len(fitted), "chosen_length": len(chosen_ids),
                         "rejected_length": len(rejected_ids),
                         "length": max(len(chosen_ids), len(rejected_ids)), "question": item.question}
