"""The tokenizer side of a GGUF export: vocabulary, merges or scores, special tokens, chat template, and the
Ollama Modelfile that goes beside the file.

Everything is read from the export folder's tokenizer.json (the fast tokenizer the run trained with), so
what llama.cpp gets is the tokenizer the model saw, not one rebuilt from another file. Two kinds exist in
the supported families: byte-level BPE (GPT-2 style: Llama-3, Qwen2, SmolLM2), written as llama.cpp's
"gpt2" model with its merges, and SentencePiece-style BPE with byte fallback (Mistral, Gemma-2), written as
its "llama" model, whose tokenizer merges the best-scoring adjacent pair first, so each token's score is
minus the rank of the merge that makes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from simpo_lite.errors import UserError

# llama.cpp's name for each pre-tokenizer (how text is split before BPE), by the tokenizer.json that has it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "bytelevel": "gpt-2",
    "digits+bytelevel": "smollm",
    f"split:{_LLAMA3_SPLIT}+bytelevel-noregex": "llama-bpe",
    f"split:{_QWEN2_SPLIT}+bytelevel-noregex": "qwen2",
}
# Tokens that end a turn in the supported chat formats: stop tokens for llama.cpp and Ollama.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")

# Ollama's Go templates for the chat formats of the supported families (the GGUF's Jinja template is
# only used by Ollama when it recognises it).
OLLAMA_TEMPLATES = {
    "chatml": ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n'),
    "llama3": ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>'),
    "gemma": ('<start_of_turn>user\n{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}<end_of_turn>\n'
              '<start_of_turn>model\n{{ .Response }}<end_of_turn>\n'),
    "mistral": '[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}</s>',
}
_TEMPLATE_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                     ("<start_of_turn>", "gemma"), ("[INST]", "mistral"))


@dataclass
class Vocab:
    kind: str                 # "bpe" (byte-level) or "spm" (SentencePiece-style)
    tokens: list[str]
    types: list[int]          # gguf.TokenType values
    scores: list[float] | None
    pre: str | None           # the pre-tokenizer's llama.cpp name (bpe only)
    add_space_prefix: bool


def tokenizer_kind(folder: Path) -> str:
    """'bpe' or 'spm' for a tokenizer.json llama.cpp can reproduce; UserError (one line) otherwise."""
    data = _tokenizer_json(folder)
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        _pre_name(data, folder)
        return "bpe"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "spm"
    raise UserError(f"the tokenizer in {folder} is a {model.get('type')} tokenizer without a GGUF form here "
                    f"(byte-level BPE or SentencePiece BPE are supported): export with --format safetensors")


def build_vocab(folder: Path, tokenizer, vocab_size: int) -> Vocab:
    """The vocabulary as llama.cpp stores it, padded to the model's embedding rows as llama.cpp pads it."""
    import gguf

    data = _tokenizer_json(folder)
    kind = tokenizer_kind(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    special = set(tokenizer.all_special_ids)
    ranks = _merge_ranks(data) if kind == "spm" else {}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # an embedding row no token uses
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED), scores.append(-1e9)
            continue
        if i == tokenizer.unk_token_id and kind == "spm":
            kind_of = gguf.TokenType.UNKNOWN
        elif i in special or (i in added and added[i].special):
            kind_of = gguf.TokenType.CONTROL
        elif i in added:
            kind_of = gguf.TokenType.USER_DEFINED
        elif kind == "spm" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind_of = gguf.TokenType.BYTE
        else:
            kind_of = gguf.TokenType.NORMAL
        tokens.append(token), types.append(int(kind_of))
        # Single characters are where merging starts; tokens no merge makes must never win a merge.
        scores.append(-float(ranks[token]) if token in ranks else (0.0 if len(token) == 1 else -1e9))
    return Vocab(kind=kind, tokens=tokens, types=types, scores=scores if kind == "spm" else None,
                 pre=_pre_name(data, folder) if kind == "bpe" else None, add_space_prefix=_space_prefix(data))


def add_vocab(writer, folder: Path, vocab: Vocab) -> None:
    """Tokens, merges or scores, special token ids and flags, and the chat template into the writer."""
    import gguf

    writer.add_tokenizer_model("gpt2" if vocab.kind == "bpe" else "llama")
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(folder, load_merges=vocab.kind == "bpe", n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # llama.cpp's default differs by tokenizer model: be explicit
        writer.add_add_bos_token(False)
    template = special.chat_template if isinstance(special.chat_template, str) else ""
    eot = next((vocab.tokens.index(t) for t in END_OF_TURN if t in template and t in vocab.tokens
                and vocab.tokens.index(t) != special.special_token_ids.get("eos")), None)
    if eot is not None:
        writer.add_eot_token_id(eot)


def stop_tokens(tokenizer) -> list[str]:
    """The end-of-sequence token and the end-of-turn tokens of the chat format."""
    vocab = tokenizer.get_vocab()
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    found += [t for t in END_OF_TURN if t in vocab and t not in found and t in (tokenizer.chat_template or "")]
    return found


def chat_format(tokenizer) -> str | None:
    template = tokenizer.chat_template or ""
    return next((name for marker, name in _TEMPLATE_MARKERS if marker in template), None)


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the file, the stop tokens, and the chat template as Ollama's Go template (with
    the default system prompt the Jinja template adds, so Ollama builds the prompt the model was tuned on)."""
    lines = [f"FROM ./{gguf_name}"]
    fmt = chat_format(tokenizer)
    if fmt:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[fmt]}"""')
        system = default_system_prompt(tokenizer) if fmt in ("chatml", "llama3") else None
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not one simpo-lite knows; Ollama reads the GGUF's own")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"


def default_system_prompt(tokenizer) -> str | None:
    """The system message the chat template inserts when the conversation has none (SmolLM2's does)."""
    marker = "\x00user-turn\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before = text.split(marker)[0]
    found = re.search(r"(?:<\|im_start\|>system\n|<\|start_header_id\|>system<\|end_header_id\|>\n\n)(.*?)"
                      r"(?:<\|im_end\|>|<\|eot_id\|>)", before, re.S)
    return found.group(1) if found else None


def _tokenizer_json(folder: Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer.json in {folder}: a GGUF export needs the fast tokenizer the run saved")
    return json.loads(path.read_text(encoding="utf-8"))


def _pre_name(data: dict, folder: Path) -> str:
    signature = _pre_signature(data.get("pre_tokenizer"))
    if signature not in PRE_TOKENIZERS:
        raise UserError(f"the tokenizer in {folder} splits text in a way simpo-lite cannot name for llama.cpp "
                        f"({signature[:80]}): llama.cpp would tokenize differently; export with --format safetensors")
    return PRE_TOKENIZERS[signature]


def _pre_signature(pre: dict | None) -> str:
    if not pre:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "+".join(_pre_signature(p) for p in pre.get("pretokenizers", []))
    if kind == "ByteLevel":
        return "bytelevel" if pre.get("use_regex", True) else "bytelevel-noregex"
    if kind == "Digits":
        return "digits" if pre.get("individual_digits") else "digits-grouped"
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return f"split:{pattern.get('Regex', pattern.get('String'))}"
    return str(kind)


def _space_prefix(data: dict) -> bool:
    """Whether a space is put before the text (SentencePiece's dummy prefix): by a Prepend normalizer or a
    Metaspace pre-tokenizer that prepends."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or bool(re.search(r'"prepend_scheme": "(first|always)"', text))


def _merge_ranks(data: dict) -> dict[str, int]:
    """Each merged token's rank: the position of the first merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks
