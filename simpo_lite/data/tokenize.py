"""Chat templating, label masking and truncation of one preference pair.

The prompt is rendered with the model's chat template and the generation prompt; the response is the
text the template adds after it for the assistant turn. Both are tokenized separately without the
tokenizer's own special tokens, so the model trains on exactly the tokens it sees at inference, and:

- BOS appears once: from the template when it renders one, else added when the tokenizer would add it;
- the response ends with the turn's end token once (``<|im_end|>``, ``<|eot_id|>``, ...): template
  text after it (a newline between turns) is dropped, and EOS is appended only when the template
  closes the turn with no special token;
- prompt tokens are labelled -100.

Fallbacks: a tokenizer without a chat template gets plain text, the prompt messages' contents joined by
blank lines plus one newline, then the response and EOS. A template that refuses system messages
(Mistral, Gemma) gets the system text prepended to the first user message instead.
"""

from __future__ import annotations

from typing import Optional

from jinja2.exceptions import TemplateError

from simpo_lite.errors import UserError
from simpo_lite.logprobs import IGNORE_INDEX  # the label of prompt tokens

TOO_LONG = "too_long"
TEMPLATE_ERROR = "template_error"
TOKENIZE_RULES = {
    TOO_LONG: "prompt + longer response exceed data.max_length even after cutting the prompt to "
              "data.max_prompt_length",
    TEMPLATE_ERROR: "the chat template refused the conversation (e.g. roles that do not alternate)",
}


def ensure_pad_token(tokenizer) -> None:
    """Padding is masked everywhere, so EOS is a safe pad token when the tokenizer has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token: set one on the model's tokenizer")
        tokenizer.pad_token = tokenizer.eos_token


class PairTokenizer:
    """Turns a normalised Pair into masked, truncated chosen/rejected token lists."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str = "keep_end"):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token, so responses cannot be ended: set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.adds_bos = self._tokenizer_adds_bos()
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}

    def _tokenizer_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return full[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    # ---- text -----------------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError:
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise
            merged = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])]
            return self.tokenizer.apply_chat_template(merged + messages[2:], tokenize=False,
                                                      add_generation_prompt=generation_prompt)

    def prompt_text(self, messages: list[dict]) -> str:
        if not self.has_template:
            return "\n\n".join(m["content"] for m in messages) + "\n"
        return self._render(messages, generation_prompt=True)

    def response_text(self, messages: list[dict], prompt: str, response: str) -> Optional[str]:
        """The template's text for the assistant turn, or None when it cannot be cut from the prompt."""
        if not self.has_template:
            return None
        full = self._render(messages + [{"role": "assistant", "content": response}], generation_prompt=False)
        # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property.
        return full[len(prompt):] if full.startswith(prompt) else None

    # ---- tokens ---------------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def finish_prompt(self, ids: list[int]) -> list[int]:
        if self.adds_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id] + ids
        return ids

    def finish_response(self, ids: list[int], templated: bool) -> list[int]:
        """End the response with the turn's end token exactly once."""
        if templated:
            ends = [i for i, t in enumerate(ids) if t in self.special_ids]
            if ends:
                tail = self.tokenizer.decode(ids[ends[-1] + 1:])
                if not tail.strip():
                    return ids[:ends[-1] + 1]
        return ids + [self.eos_id]

    def truncate_prompt(self, ids: list[int]) -> list[int]:
        """Cut the prompt to max_prompt_length tokens, keeping a leading BOS at the front. Not where the
        "BOS" opens every turn (SmolLM2's <|im_start|>): kept alone, it would head a turn with no role."""
        n = self.max_prompt_length
        if len(ids) <= n:
            return ids
        if self.truncation_mode == "keep_start":
            return ids[:n]
        if self.bos_id is not None and ids[0] == self.bos_id and n > 1 and self.bos_id not in ids[1:]:
            return ids[:1] + ids[len(ids) - (n - 1):]
        return ids[len(ids) - n:]

    def fit(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> Optional[list[int]]:
        """As in the reference trainer: cut the prompt only when the pair is too long; None if still too long."""
        longer = max(len(chosen), len(rejected))
        if len(prompt) + longer > self.max_length:
            prompt = self.truncate_prompt(prompt)
        if len(prompt) + longer > self.max_length:
            return None
        return prompt

    @staticmethod
    def join(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
