"""`simpo-lite chat`: the session's history and context rule, and the command driven as a person would,
in a real terminal (tmux)."""

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from simpo_lite.chat import ChatSession, TurnTooLong, run_loop
from simpo_lite.errors import UserError
from simpo_lite.generate import generation_config, render_messages
from tiny_models import tiny_model_folder, tiny_run_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", sharpen=True)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from simpo_lite.target import load_target_model, load_target_tokenizer, resolve_target

    target = resolve_target(str(model_dir))
    return load_target_model(target), load_target_tokenizer(target)


def session(loaded, context=400, max_new_tokens=6, system=None):
    model, tokenizer = loaded
    return ChatSession(model, tokenizer, generation_config(tokenizer, model, max_new_tokens, 0.0), context, system=system)


def scripted(lines):
    """A `read` that types `lines` and then ends the input (Ctrl-D)."""
    pending = list(lines)

    def read(prompt):
        if not pending:
            raise EOFError
        return pending.pop(0)
    return read


def test_history_carries_every_turn_and_reset_clears_it(loaded):
    chat, said, written = session(loaded, system="Be brief."), [], []
    answered = run_loop(chat, said.append, scripted(["Hi there", "And again?"]), written.append)
    assert answered == 2
    roles = [m["role"] for m in chat.messages([])]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert chat.history[0]["content"] == "Hi there" and chat.history[1]["content"].strip()
    # What was streamed is the answer that was kept.
    streamed = "".join(written).split("model> ")
    assert streamed[1].strip() == chat.history[1]["content"]
    run_loop(chat, said.append, scripted(["/reset", "/bogus"]), written.append)
    assert chat.history == [] and "history cleared" in said
    assert any("unknown command /bogus" in line for line in said)


def test_exit_command_stops_before_reading_more(loaded):
    chat = session(loaded)
    assert run_loop(chat, print, scripted(["/exit", "never read"]), lambda text: None) == 0
    assert chat.history == []


def test_oldest_turns_are_dropped_when_the_context_is_full_and_the_user_is_told(loaded):
    messages = ["Tell me about the sea.", "And the mountains?", "And the desert?"]
    roomy = session(loaded, context=10_000)
    run_loop(roomy, print, scripted(messages[:2]), lambda text: None)
    third = {"role": "user", "content": messages[2]}
    full = len(render_messages(roomy.tokenizer, roomy.messages([third])))
    # One token too few for the whole history plus the third message and its answer (6 tokens).
    chat, said = session(loaded, context=full - 1 + 6), []
    run_loop(chat, said.append, scripted(messages), lambda text: None)
    assert [line for line in said if "outgrew the context" in line] == [
        f"the conversation outgrew the context of {full + 5} tokens: dropped the oldest 1 turn to make room"]
    assert [m["content"] for m in chat.history if m["role"] == "user"] == messages[1:]
    assert chat.history[:2] == roomy.history[2:]  # the second turn, kept as it was


def test_a_message_longer_than_the_context_is_refused_and_the_history_kept(loaded):
    model, tokenizer = loaded
    first = len(render_messages(tokenizer, [{"role": "user", "content": "Hi"}]))
    chat, said = session(loaded, context=first + 6 + 40), []
    run_loop(chat, said.append, scripted(["Hi", "word " * 200]), lambda text: None)
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["Hi"]
    # Longer than the whole context: no shorter answer makes room for it.
    assert any("shorten it or raise --max-context" in line for line in said)
    with pytest.raises(TurnTooLong):
        chat.fit({"role": "user", "content": "word " * 200})
    assert len(chat.history) == 2
    # Within the context, but not with room for a 6-token answer: a shorter answer would do.
    message = {"role": "user", "content": "word " * 20}
    tight = session(loaded, context=len(render_messages(tokenizer, [message])) + 3)
    with pytest.raises(TurnTooLong, match="shorten it or lower --max-new-tokens"):
        tight.fit(message)


def test_a_message_that_starts_with_a_path_is_sent_not_taken_for_a_command(loaded):
    chat, said = session(loaded), []
    assert run_loop(chat, said.append, scripted(["/etc/passwd"]), lambda text: None) == 1
    assert chat.history[0]["content"] == "/etc/passwd" and not [line for line in said if "unknown command" in line]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(temperature=-1.0), "--temperature"),
    (dict(top_p=0.0), "--top-p"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(max_context=10, max_new_tokens=20), "--max-context 10"),
])
def test_bad_flags_are_user_errors(model_dir, kwargs, fragment):
    from simpo_lite.chat import chat_command

    with pytest.raises(UserError, match=fragment):
        chat_command(str(model_dir), **kwargs)


# ---- as a person uses it: a terminal, keys, what the screen shows -------------------------------

class Terminal:
    """A command running in a detached tmux session on a server of its own; keys in, screen text out."""

    PASSED_ON = ("PATH", "HOME", "PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "SIMPO_LITE_CACHE", "HF_HOME", "TOKENIZERS_PARALLELISM")

    def __init__(self, command: str, cwd):
        import os

        self.socket = f"simpo-chat-{uuid.uuid4().hex[:8]}"
        env = [arg for name in self.PASSED_ON if name in os.environ for arg in ("-e", f"{name}={os.environ[name]}")]
        # The shell stays after the command, so its exit status can be read off the screen.
        self.tmux("new-session", "-d", "-s", "chat", "-x", "400", "-y", "50", "-c", str(cwd), *env,
                  f"{command}; echo EXIT=$?; sleep 600")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-S", "-200", "-t", "chat")

    def type(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{text!r} (x{count}) never appeared; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_terminal(tmp_path, model_dir):
    run = tiny_run_folder(tmp_path / "run", model_dir)
    term = Terminal(f"{sys.executable} -m simpo_lite chat {run} --temperature 0 --max-new-tokens 8", tmp_path)
    try:
        term.wait_for("you>")
        term.type("What is the capital of France?", "Enter")
        term.wait_for("you>", count=2)
        term.type("And of Spain?", "Enter")
        term.wait_for("you>", count=3)
        term.type("/reset", "Enter")
        term.wait_for("history cleared")
        term.type("/exit", "Enter")
        screen = term.wait_for("EXIT=")
    finally:
        term.close()
    assert "EXIT=0" in screen and "Traceback" not in screen
    assert "4-bit NF4 + LoRA adapter" in screen  # a run loads as it trained
    answers = [line.split("model> ", 1)[1] for line in screen.splitlines() if "model> " in line]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    # Nothing that is not ours: no library warnings or bars on the screen.
    assert "Warning" not in screen and "Loading weights" not in screen and "kernels" not in screen


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_ctrl_c_and_ctrl_d_leave_cleanly(tmp_path, model_dir):
    for keys in (["C-c"], ["C-d"]):
        term = Terminal(f"{sys.executable} -m simpo_lite chat {model_dir} --max-new-tokens 4", tmp_path)
        try:
            term.wait_for("you>")
            term.type(*keys)
            screen = term.wait_for("EXIT=")
        finally:
            term.close()
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
