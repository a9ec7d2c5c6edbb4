"""Row formats: find the prompt/chosen/rejected/system columns, check each row, normalise it to one shape.

Every supported format becomes a `Pair`: the prompt as a message list (system message first when there
is one) plus the chosen and rejected responses as plain text. Accepted per row:

- ``prompt``/``chosen``/``rejected`` as strings;
- conversational: ``prompt`` a string or message list, ``chosen``/``rejected`` one-message lists;
- UltraFeedback-style: ``chosen``/``rejected`` each repeat the whole conversation; their shared
  prefix is the prompt (a ``prompt`` column, if any, is then ignored) and the last assistant turn
  the response;
- Anthropic HH-style: ``chosen``/``rejected`` each a whole text transcript of "\n\nHuman: ..." and
  "\n\nAssistant: ..." turns, no prompt column; read as the UltraFeedback style (the turns become
  messages, earlier turns kept as history). A ``prompt`` string in that form is read as turns too.

Where the two sides of a row carry different conversations before their last turn, the row is skipped
under DIFFERENT_PROMPTS: mixing them would train a preference between answers to different questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from simpo_lite.errors import UserError

FIELDS = ("prompt", "chosen", "rejected", "system")
# Column names recognised without a mapping, in order of preference.
ALIASES = {
    "prompt": ("prompt", "instruction", "question"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "system": ("system", "system_prompt"),
}

# Why a row is skipped; the order is the order the checks run in.
MISSING_FIELD = "missing_field"
NOT_TEXT = "not_text"
UNKNOWN_ROLE = "unknown_role"
BAD_CONVERSATION = "bad_conversation"
DIFFERENT_PROMPTS = "different_prompts"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
IDENTICAL = "identical_responses"
RULES = {
    MISSING_FIELD: "a prompt, chosen or rejected value is missing (null or no such column)",
    NOT_TEXT: "a value is neither text nor a list of {role, content} messages",
    UNKNOWN_ROLE: "a message's role is not system, user, assistant or tool (human and gpt, as ShareGPT writes "
                  "them, are read as user and assistant)",
    BAD_CONVERSATION: "a message list or transcript is empty or does not end with an assistant turn",
    DIFFERENT_PROMPTS: "chosen and rejected differ before their last turn (answers to different prompts)",
    EMPTY_PROMPT: "the prompt is empty",
    EMPTY_RESPONSE: "the chosen or rejected response is empty",
    IDENTICAL: "chosen and rejected are the same text",
}

# Row kinds counted in the report.
KIND_STRINGS = "prompt/chosen/rejected strings"
KIND_CONVERSATIONAL = "conversational (response message lists)"
KIND_REPEATED = "UltraFeedback-style (chosen/rejected repeat the conversation)"
KIND_HH = "Anthropic HH-style (Human:/Assistant: transcripts)"

# A turn of an HH transcript: "\n\nHuman: " or "\n\nAssistant: " (the first one may lack the newlines).
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Columns:
    """Which dataset column holds each field; prompt and system may be absent."""

    chosen: str
    rejected: str
    prompt: Optional[str] = None
    system: Optional[str] = None

    def describe(self) -> str:
        return ", ".join(f"{f}={getattr(self, f)}" for f in FIELDS if getattr(self, f))


@dataclass
class Pair:
    messages: list[dict]
    chosen: str
    rejected: str
    kind: str


class RowProblem(Exception):
    """A row that cannot be used; `rule` is one of RULES."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


def resolve_columns(names: Sequence[str], mapping: Mapping[str, str], where: str) -> Columns:
    """Columns from the explicit mapping (data.columns), else from the known aliases."""
    problems = [f"data.columns: unknown field '{k}'; the fields are {', '.join(FIELDS)}"
                for k in mapping if k not in FIELDS]
    found = {}
    for field in FIELDS:
        if field in mapping:
            if mapping[field] not in names:
                problems.append(f"data.columns.{field}: no column '{mapping[field]}' in {where}")
            found[field] = mapping[field]
        else:
            found[field] = next((a for a in ALIASES[field] if a in names), None)
    missing = [f"'{field}'" for field in ("chosen", "rejected") if found[field] is None]
    if missing:
        problems.append(f"no {' or '.join(missing)} column in {where}")
    if problems:  # all at once, then the columns there are and how to map them
        raise UserError(f"{'; '.join(problems)} (its columns: {', '.join(names)}); map them with "
                        f"--set 'data.columns={{chosen: NAME, rejected: NAME, prompt: NAME}}'")
    return Columns(**found)


ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's {"from": "human" | "gpt", "value": ...}; other spellings of the same two roles.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _messages(value: Any) -> list[dict]:
    """A validated copy of a message list: dicts with a known role and text content. A role the chat
    template does not know would be rendered as written (`<|im_start|>human`), a turn the model never
    sees in use, so it is read through ROLE_ALIASES or the row is skipped."""
    if not value:
        raise RowProblem(BAD_CONVERSATION)
    out = []
    for message in value:
        if not isinstance(message, Mapping):
            raise RowProblem(NOT_TEXT)
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowProblem(NOT_TEXT)
        role = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        if role not in ROLES:
            raise RowProblem(UNKNOWN_ROLE)
        out.append({"role": role, "content": content})
    return out


def is_transcript(text: str) -> bool:
    """Text in the HH form: it opens with a Human turn and holds an Assistant turn."""
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def transcript_messages(text: str) -> list[dict]:
    """The turns of an HH transcript as messages; a trailing empty Assistant turn (a prompt) is dropped."""
    parts = HH_TURN.split(text.lstrip("\n"))
    if parts[0].strip():  # text before the first turn marker
        raise RowProblem(BAD_CONVERSATION)
    messages = [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    return messages


def _response(value: Any) -> tuple[list[dict], str]:
    """(conversation before the response, response text) of a chosen/rejected value."""
    if value is None:
        raise RowProblem(MISSING_FIELD)
    if isinstance(value, str):
        if is_transcript(value):
            messages = transcript_messages(value)
            if not messages or messages[-1]["role"] != "assistant":
                raise RowProblem(BAD_CONVERSATION)
            return messages[:-1], messages[-1]["content"]
        return [], value
    if not isinstance(value, (list, tuple)):
        raise RowProblem(NOT_TEXT)
    messages = _messages(value)
    if messages[-1]["role"] != "assistant":
        raise RowProblem(BAD_CONVERSATION)
    return messages[:-1], messages[-1]["content"]


def _prompt(value: Any) -> list[dict]:
    if value is None:
        raise RowProblem(MISSING_FIELD)
    if isinstance(value, str):
        return transcript_messages(value) if is_transcript(value + "\n\nAssistant:") else \
            [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise RowProblem(NOT_TEXT)
    return _messages(value)


def _system(row: Mapping, cols: Columns, default: Optional[str]) -> Optional[str]:
    value = row.get(cols.system) if cols.system else None
    if value is not None and not isinstance(value, str):
        raise RowProblem(NOT_TEXT)
    return value if value and value.strip() else default


def normalise(row: Mapping, cols: Columns, system_prompt: Optional[str] = None) -> Pair:
    """One row as a Pair, or RowProblem naming the first rule it breaks."""
    if not isinstance(row, Mapping):  # a JSON line holding a list or a number
        raise RowProblem(MISSING_FIELD)
    before_chosen, chosen = _response(row.get(cols.chosen))
    before_rejected, rejected = _response(row.get(cols.rejected))
    if before_chosen or before_rejected:
        # A one-sided string response takes the other side's conversation.
        if before_chosen and before_rejected and before_chosen != before_rejected:
            raise RowProblem(DIFFERENT_PROMPTS)
        messages = before_chosen or before_rejected
        kind = KIND_HH if any(isinstance(row.get(c), str) for c in (cols.chosen, cols.rejected)) else KIND_REPEATED
    else:
        if cols.prompt is None:
            raise RowProblem(MISSING_FIELD)
        messages = _prompt(row.get(cols.prompt))
        response_lists = not isinstance(row.get(cols.chosen), str)
        kind = KIND_CONVERSATIONAL if response_lists or len(messages) > 1 else KIND_STRINGS
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise RowProblem(EMPTY_PROMPT)
    if not chosen.strip() or not rejected.strip():
        raise RowProblem(EMPTY_RESPONSE)
    if chosen.strip() == rejected.strip():
        raise RowProblem(IDENTICAL)
    system = _system(row, cols, system_prompt)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return Pair(messages=messages, chosen=chosen, rejected=rejected, kind=kind)
