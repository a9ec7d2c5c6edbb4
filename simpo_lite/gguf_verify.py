"""Reading a GGUF export back with real readers and comparing it with the merged model it came from.

transformers' GGUF loader (always) and llama.cpp itself (where llama-cpp-python is installed) run the
export check prompts; both are compared with the merged model in fp32 by the share of positions whose most
likely next token is the same (top-1 agreement) and the largest logit difference. llama.cpp also tokenizes
the prompts (a wrong tokenizer is the commonest broken GGUF), gives next-token log-probs, and continues
each prompt greedily for merge.CONTINUATION_TOKENS tokens. A file that reproduces the merged model's
choices at fewer than MIN_TOP1 of the positions is refused: conversion bugs land far below it, rounding
does not (f16 agrees at >= 99% on the demo model; q4_k_m is reported, never refused).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch

from simpo_lite.errors import RunError

MIN_TOP1 = {"f16": 0.9, "bf16": 0.9, "q8_0": 0.9}
CONTEXT = 512


def verify(path: Path, merged_dir: Path, quant: str, say: Callable[[str], None]) -> dict:
    """The comparisons as a dict for the export result and card; RunError when the file fails them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo_lite.generate import stop_ids
    from simpo_lite.merge import PROMPTS, check_prompt_ids, greedy_answers, logits

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = check_prompt_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map="cpu")
    reference, reference_greedy = logits(merged, ids), greedy_answers(merged, tokenizer, ids)
    stops = stop_ids(tokenizer, merged)
    del merged
    gc.collect()
    report = {"quant": quant, "file": path.name, "size_mb": round(path.stat().st_size / 2**20, 1),
              "transformers": transformers_check(path, ids, reference)}
    if _llama_cpp_installed():
        report["llama_cpp"] = llama_cpp_check(path, tokenizer, PROMPTS, ids, reference, reference_greedy, stops)
    else:
        from simpo_lite.gguf_export import LLAMA_CPP_HINT

        report["llama_cpp"] = None
        say(f"info: llama.cpp itself was not run on the file: {LLAMA_CPP_HINT}")
    if report["llama_cpp"] and not report["llama_cpp"]["same_chat_tokens"]:
        say("warning: llama.cpp tokenizes the chat-formatted prompts differently from the run's tokenizer (around "
            "special tokens, e.g. a space after them); the check compares logits on the run's own tokens")
    _check(report, path)
    return report


def check_lines(report: dict) -> list[str]:
    """The GGUF checks' figures, as the export prints them once the export is saved."""
    quant, t, c = report["quant"], report["transformers"], report.get("llama_cpp")
    lines = [f"check: transformers reads the {quant} GGUF: same most likely next token at {t['top1']:.1%} of "
             f"{t['positions']} positions, max |logit diff| {t['max_logit_diff']:.3g} vs the merged model (fp32)"]
    if c:
        lines.append(f"check: llama.cpp runs the {quant} GGUF: tokenizes the check prompts "
                     f"{'the same' if c['same_tokens'] else 'DIFFERENTLY'}; same most likely next token at "
                     f"{c['top1']:.1%} of positions, max |logit diff| {c['max_logit_diff']:.3g}, max |next-token "
                     f"log-prob diff| {c['max_logprob_diff']:.3g}; greedy continuations repeat "
                     f"{c['greedy_agreement']:.0%} of the merged model's first tokens")
    return lines


def prompt_texts(tokenizer, prompts) -> list[tuple[str, bool]]:
    """(text, whether the tokenizer puts BOS before it) of each check prompt, as merge.check_prompt_ids tokenizes it."""
    if tokenizer.chat_template:
        return [(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False), False) for p in prompts]
    with_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return [(p, with_bos) for p in prompts]


def transformers_check(path: Path, ids: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    from transformers import AutoModelForCausalLM

    from simpo_lite.merge import logits

    from transformers.utils import logging

    logging.disable_progress_bar()  # its dequantizing bar is not ours to show
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     device_map="cpu")
    finally:
        logging.enable_progress_bar()
    got = logits(model, ids)
    del model
    gc.collect()
    return compare(got, reference)


def compare(got: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    from simpo_lite.merge import max_diff, top1_agreement

    return {"top1": top1_agreement(got, reference), "max_logit_diff": max_diff(got, reference),
            "positions": sum(r.shape[0] * r.shape[1] for r in reference)}


def llama_cpp_check(path: Path, tokenizer, prompts, ids: list[torch.Tensor], reference: list[torch.Tensor],
                    reference_greedy: list[list[int]], stops: list[int]) -> dict:
    """llama.cpp's tokens, logits and greedy continuation of each check prompt, against the merged model.
    The logits are computed on the run's own token ids, so a tokenizer difference cannot hide in them."""
    from simpo_lite.merge import continuation_agreement

    llm = load_llama(path)
    try:
        same_tokens = all(llm.tokenize(p.encode(), add_bos=False, special=False)
                          == tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts)
        same_chat_tokens = all(llm.tokenize(text.encode(), add_bos=add_bos, special=True) == i[0].tolist()
                               for (text, add_bos), i in zip(prompt_texts(tokenizer, prompts), ids))
        got, greedy = [], []
        for prompt in ids:
            tokens = prompt[0].tolist()
            llm.reset()
            llm.eval(tokens)
            got.append(torch.from_numpy(llm.scores[:len(tokens)].copy()).float().unsqueeze(0))
            greedy.append(_greedy(llm, stops))
    finally:
        llm.close()
    report = compare(got, reference)
    # Log-probs of the token the merged model ranks first: the numbers a sampler acts on.
    report["max_logprob_diff"] = max(
        (torch.log_softmax(g, -1) - torch.log_softmax(r, -1)).gather(-1, r.argmax(-1, keepdim=True)).abs().max().item()
        for g, r in zip(got, reference))
    report["same_tokens"], report["same_chat_tokens"] = same_tokens, same_chat_tokens
    report["greedy_agreement"] = continuation_agreement(greedy, reference_greedy)
    return report


def _greedy(llm, stops: list[int]) -> list[int]:
    """llama.cpp's greedy tokens up to (not including) a stop token, as merge.greedy_answers counts them."""
    from simpo_lite.merge import CONTINUATION_TOKENS

    out = []
    for _ in range(CONTINUATION_TOKENS):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


def load_llama(path: Path):
    """llama.cpp's model on the CPU, without the repacked weight buffers: their AMX kernels crash (segfault)
    on this project's AVX512/AMX CPU for any quantized file, even llama.cpp's own; plain kernels only cost speed."""
    import os

    import llama_cpp.llama as llama_module

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    # Llama() takes its model parameters from this function and has no argument for the field.
    llama_module.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_module.Llama(model_path=str(path), n_ctx=CONTEXT, logits_all=True, verbose=False,
                                  n_threads=threads, n_threads_batch=threads)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def _llama_cpp_installed() -> bool:
    from simpo_lite.gguf_export import llama_cpp_available

    return llama_cpp_available()


def _check(report: dict, path: Path) -> None:
    floor = MIN_TOP1.get(report["quant"])
    for reader in ("transformers", "llama_cpp"):
        found = report.get(reader)
        if not found:
            continue
        if reader == "llama_cpp" and not found["same_tokens"]:
            raise RunError("GGUF check failed: llama.cpp tokenizes the check prompts differently from the run's "
                           "tokenizer, so the file would answer other text than it is given; nothing was written "
                           "(please report it with the run's config.yaml)")
        if floor is not None and not found["top1"] >= floor:
            raise RunError(f"GGUF check failed: read by {reader}, {path.name} picks the merged model's most likely "
                           f"token at only {found['top1']:.1%} of positions (at least {floor:.0%} expected for "
                           f"{report['quant']}); nothing was written (please report it with the run's config.yaml)")
