"""`simpo-lite chat`: talk to a run, an export or a base model in the terminal.

The model is loaded as `eval` and `generate` load it (target.py: a run is its 4-bit base with the saved
adapter, exactly as training ran it), each turn goes through the model's chat template with the whole
history, and the answer is printed token by token as it is generated. When the history no longer fits
the context (with room for an answer), the oldest turns are dropped, and the user is told.

Answers go to stdout, everything else (loading, notes) to stderr.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from simpo_lite.errors import UserError

RESET, EXIT = "/reset", "/exit"


def context_length(model, tokenizer) -> int:
    """The model's context in tokens: its config's position limit, else the tokenizer's (when set)."""
    from simpo_lite.logprobs import text_config

    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if not limit:
        limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 10**7:  # transformers' "no limit" is a huge int
        raise UserError("the model states no context length: give one with --max-context TOKENS")
    return int(limit)


class TurnTooLong(Exception):
    """The user's message alone leaves no room for an answer within the context."""


@dataclass
class ChatSession:
    """A conversation: the history, and one call per user message that streams the answer."""

    model: object
    tokenizer: object
    generation: object           # transformers.GenerationConfig
    context: int                 # tokens of prompt plus answer at most
    system: Optional[str] = None
    history: list[dict] = field(default_factory=list)

    def messages(self, extra: list[dict]) -> list[dict]:
        return self._with(self.history, *extra)

    def _with(self, history: list[dict], *extra: dict) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + history + list(extra)

    def fit(self, user: dict) -> tuple[list[int], int]:
        """Prompt ids of the history plus `user`, after dropping the fewest oldest turns that make it
        fit with room for --max-new-tokens; (ids, turns dropped)."""
        from simpo_lite.generate import render_messages

        room = self.context - self.generation.max_new_tokens
        history = self.history
        while True:
            ids = render_messages(self.tokenizer, self._with(history, user))
            if len(ids) <= room:
                dropped = (len(self.history) - len(history)) // 2
                self.history = history
                return ids, dropped
            if not history:  # the history stays as it was: the message is not sent
                # A shorter answer only helps where the message alone fits the context.
                fix = "lower --max-new-tokens" if len(ids) < self.context else "raise --max-context"
                raise TurnTooLong(f"this message takes {len(ids)} tokens: with room for an answer of "
                                  f"--max-new-tokens {self.generation.max_new_tokens} the context of "
                                  f"{self.context} tokens holds {room}; shorten it or {fix}")
            history = history[2:]  # one user turn and its answer

    def reply(self, text: str, write: Callable[[str], None], before: Callable[[int], None] = lambda dropped: None) -> dict:
        """Stream the answer to `text` through `write`; keep the turn in the history. `before(dropped)` is
        called once the history fits, before the answer starts.

        {text, tokens, truncated, dropped}. Ctrl-C during the answer propagates and keeps no part of it.
        """
        import torch

        from simpo_lite.generate import decode_answer
        from simpo_lite.target import model_device

        user = {"role": "user", "content": text}
        ids, dropped = self.fit(user)
        before(dropped)
        streamer = _streamer(self.tokenizer, write)
        device = model_device(self.model)
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                                      generation_config=self.generation, streamer=streamer)
        answer = decode_answer(self.tokenizer, out[0, len(ids):].tolist(), list(self.generation.eos_token_id),
                               self.generation.max_new_tokens)
        self.history += [user, {"role": "assistant", "content": answer["text"]}]
        return {**answer, "dropped": dropped}

    def reset(self) -> None:
        self.history = []


def _streamer(tokenizer, write: Callable[[str], None]):
    """transformers' TextStreamer, writing through `write` instead of print."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text + ("\n" if stream_end else ""))

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _read_line(prompt: str) -> str:
    """One line of input; the prompt is shown (and line editing on) only on a terminal."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history in input())
        except ImportError:
            pass
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_loop(session: ChatSession, say: Callable[[str], None], read: Callable[[str], str] = _read_line,
             write: Callable[[str], None] = _write) -> int:
    """Read messages until /exit, end of input or Ctrl-C at the prompt; returns the turns answered."""
    def before(dropped: int) -> None:
        if dropped:
            say(f"the conversation outgrew the context of {session.context} tokens: dropped the oldest "
                f"{dropped} turn{'s' if dropped != 1 else ''} to make room")
        write("model> ")

    answered = 0
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return answered
        if not text:
            continue
        if text.lower() in (EXIT, "/quit"):
            return answered
        if text.lower() == RESET:
            session.reset()
            say("history cleared")
            continue
        if re.fullmatch(r"/\w+", text):  # a command's shape; '/etc/passwd' is a message
            say(f"unknown command {text}: {RESET} clears the history, {EXIT} quits")
            continue
        try:
            answer = session.reply(text, write, before)
        except TurnTooLong as err:
            say(str(err))
            continue
        except KeyboardInterrupt:
            write("\n")
            say("interrupted: this answer is not kept in the history")
            continue
        answered += 1
        if answer["truncated"]:
            say(f"answer cut at --max-new-tokens {session.generation.max_new_tokens}")


def chat_command(model_or_run: str, system: str | None = None, preset: str | None = None, config=None,
                 max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                 max_context: int | None = None, sets: list[str] | None = None) -> int:
    import torch

    from simpo_lite.console import info
    from simpo_lite.generate import check_sampling, generation_config
    from simpo_lite.target import load_target_model, load_target_tokenizer, resolve_target

    check_sampling(max_new_tokens, temperature, top_p)
    if max_context is not None and max_context <= max_new_tokens:
        raise UserError(f"--max-context {max_context} leaves no room for a prompt with --max-new-tokens "
                        f"{max_new_tokens}: give a larger --max-context or a smaller --max-new-tokens")
    target = resolve_target(model_or_run, preset=preset, config=config, sets=sets)
    tokenizer = load_target_tokenizer(target)
    info(f"loading {target.describe()}")
    model = load_target_model(target)
    context = max_context or context_length(model, tokenizer)
    if max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} is not below the model's context of {context} tokens")
    torch.manual_seed(target.cfg.train.seed if seed is None else seed)
    session = ChatSession(model, tokenizer, generation_config(tokenizer, model, max_new_tokens, temperature, top_p),
                          context, system=target.cfg.data.system_prompt if system is None else (system or None))
    sampling = "greedy" if temperature == 0 else f"temperature {temperature:g}, top-p {top_p:g}"
    info(f"ready ({sampling}, context {context} tokens). {RESET} clears the history, {EXIT} or Ctrl-D quits.")
    return run_loop(session, say=info)
