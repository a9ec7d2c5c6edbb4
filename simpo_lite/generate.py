"""`simpo-lite generate`: answers to benchmark prompts in AlpacaEval's format, with length statistics.

The output is what AlpacaEval's evaluators read (a JSON list of {instruction, output, generator}), so
`alpaca_eval --model_outputs OUT` scores it directly. Response lengths are reported alongside: SimPO's
length-normalised reward is meant not to make answers longer, and a win rate means little without them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from simpo_lite.errors import UserError
from simpo_lite.files import check_output_path, missing_path, read_text, write_json


def _prompt_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("instruction", "prompt"):
            if isinstance(item.get(key), str):
                return item[key]
        turns = item.get("turns")  # Arena-Hard question files: one user turn
        if isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], dict) and isinstance(turns[0].get("content"), str):
            return turns[0]["content"]
    raise UserError(f"{where}: expected a string or an object with an 'instruction' or 'prompt' string; "
                    f"rename the prompt field or fix the row")


def read_prompts(path: Path) -> list[dict]:
    """[{instruction, and 'dataset' when given}] from a JSON list or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_path(str(path), "--prompts", "give a JSON list or JSON-lines file of prompts"))
    text = read_text(path, "--prompts takes a JSON list or a JSON-lines file of prompts", f"--prompts {path}")
    if not text.strip():
        raise UserError(f"--prompts '{path}' holds no prompts")
    if path.suffix.lower() == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"--prompts '{path}' line {number} is not valid JSON: {err.msg}; fix or delete "
                                    f"that line") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--prompts '{path}' is not valid JSON (line {err.lineno}): {err.msg}; a file with one "
                            f"JSON object per line must end in .jsonl") from None
        if not isinstance(data, list):
            raise UserError(f"--prompts '{path}': expected a JSON list of prompts, got a {type(data).__name__}; "
                            f"use a list or a .jsonl file")
        items = [(f"{path} item {i}", row) for i, row in enumerate(data)]
    if not items:
        raise UserError(f"--prompts '{path}' holds no prompts")
    prompts = []
    for where, row in items:
        prompt = {"instruction": _prompt_text(row, where)}
        if isinstance(row, dict) and isinstance(row.get("dataset"), str):
            prompt["dataset"] = row["dataset"]  # AlpacaEval reports win rates per source dataset
        prompts.append(prompt)
    return prompts


def render(tokenizer, instruction: str, system_prompt: str | None) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's opening."""
    return render_messages(tokenizer, ([{"role": "system", "content": system_prompt}] if system_prompt else [])
                           + [{"role": "user", "content": instruction}])


def render_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant turn's opening."""
    if not getattr(tokenizer, "chat_template", None):
        # No template (a base model): the turns as plain text, with the tokenizer's usual special tokens.
        if len(messages) == 1 or all(m["role"] == "system" for m in messages[:-1]):
            return tokenizer(messages[-1]["content"])["input_ids"]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        return tokenizer(text)["input_ids"]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja raises its own TemplateError, e.g. for a refused system role
        raise UserError(f"the chat template rejected the prompt ({err}); if it refuses system messages, "
                        f"use --set data.system_prompt=null") from None
    # The rendered template already holds every special token (BOS included): adding them again
    # would put a second BOS in front.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer plus the model's own end-of-turn tokens (Llama-3's <|eot_id|>, ...)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def _batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar prompt length (longest first, so memory runs out early if at all)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise UserError(f"--temperature {temperature:g}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p:g}: must be above 0 and at most 1 (1 = no nucleus cut)")


def generation_config(tokenizer, model, max_new_tokens: int, temperature: float, top_p: float = 1.0):
    """transformers' GenerationConfig for our decoding: greedy at temperature 0, else sampling (no top-k)."""
    from transformers import GenerationConfig

    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    # use_cache: a model prepared for training has it off in its config, and without it every new token
    # reruns the whole sequence.
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                            **sampling)


def generate_responses(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                       batch_size: int, seed: int, progress=None, top_p: float = 1.0) -> list[dict]:
    """[{text, ids, tokens, truncated}] in prompt order; rows are left-padded so every prompt ends where
    generation starts (batch_size 1: no padding, the numbers of a lone prompt)."""
    import torch

    from simpo_lite.target import model_device

    device = model_device(model)
    gen_cfg = generation_config(tokenizer, model, max_new_tokens, temperature, top_p)
    stops, pad = list(gen_cfg.eos_token_id), gen_cfg.pad_token_id
    if temperature > 0:  # greedy draws nothing, and must leave a training run's random streams alone
        torch.manual_seed(seed)
    results: list[dict | None] = [None] * len(prompt_ids)
    done = 0
    for batch in _batches(prompt_ids, batch_size):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompt_ids[i])
            ids[row, width - n:] = torch.tensor(prompt_ids[i])
            mask[row, width - n:] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        for row, i in enumerate(batch):
            results[i] = decode_answer(tokenizer, out[row, width:].tolist(), stops, max_new_tokens)
        done += len(batch)
        if progress:
            progress(done, len(prompt_ids))
    return results


def decode_answer(tokenizer, new_ids: list[int], stops: list[int], max_new_tokens: int) -> dict:
    """The response up to its first stop token (text, its token ids and their count); the rest is padding
    of shorter rows."""
    end = next((k for k, t in enumerate(new_ids) if t in stops), None)
    tokens = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {"text": text, "ids": tokens, "tokens": len(tokens),
            "truncated": end is None and len(new_ids) >= max_new_tokens}


def length_stats(responses: list[dict]) -> dict:
    tokens = [r["tokens"] for r in responses]
    chars = [len(r["text"]) for r in responses]
    return {"responses": len(responses),
            "tokens": {"mean": statistics.fmean(tokens), "median": statistics.median(tokens), "max": max(tokens)},
            "characters": {"mean": statistics.fmean(chars), "median": statistics.median(chars), "max": max(chars)},
            "hit_max_new_tokens": sum(r["truncated"] for r in responses)}


def stats_path(out: Path) -> Path:
    return out.with_name(out.stem + ".lengths.json")


def print_stats(stats: dict, generator: str, max_new_tokens: int) -> None:
    from simpo_lite.console import info, print_table

    print_table(["response length", "mean", "median", "max"],
                [[unit, f"{stats[unit]['mean']:.1f}", f"{stats[unit]['median']:.1f}", str(stats[unit]["max"])]
                 for unit in ("tokens", "characters")],
                title=f"{generator}: {stats['responses']} responses", markup=False)
    if stats["hit_max_new_tokens"]:
        info(f"{stats['hit_max_new_tokens']} responses stopped at --max-new-tokens {max_new_tokens} "
             f"without finishing: raise it for a fair length comparison")


def eval_split_prompts(target, tokenizer) -> tuple[list[dict], list[list[int]]]:
    """The eval split's prompts of the target's data, templated exactly as training saw them."""
    from simpo_lite.data import build_datasets

    prepared = build_datasets(target.cfg.data, tokenizer, target.cfg.train.seed)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise UserError(f"data '{target.cfg.data.source}' has no eval pairs to take prompts from: give --prompts "
                        f"FILE, or --set data.eval_fraction=0.1")
    rows = [prepared.eval[i] for i in range(len(prepared.eval))]
    return ([{"instruction": row["question"], "dataset": target.cfg.data.source} for row in rows],
            [row["chosen_input_ids"][:row["prompt_length"]] for row in rows])


def generate_command(model_or_run: str, out: Path, prompts: Path | None = None, max_new_tokens: int = 512,
                     temperature: float = 0.0, top_p: float = 1.0, generator: str | None = None,
                     preset: str | None = None, config: Path | None = None, data: str | None = None,
                     sets: list[str] | None = None, overwrite: bool = False) -> list[dict]:
    from simpo_lite.console import info
    from simpo_lite.target import load_target_model, load_target_tokenizer, resolve_target

    check_sampling(max_new_tokens, temperature, top_p)
    out = Path(out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out '{out}' must end in .json: AlpacaEval reads a JSON list")
    check_output_path(out)
    if out.exists() and not overwrite:  # a benchmark's answers can take hours to make again
        raise UserError(f"--out '{out}' exists: add --overwrite to replace it (and its .lengths.json), or choose "
                        f"another --out")
    items = read_prompts(prompts) if prompts is not None else None
    target = resolve_target(model_or_run, preset=preset, config=config, data=data, sets=sets)
    name = generator or target.label
    tokenizer = load_target_tokenizer(target)
    if items is None:
        items, prompt_ids = eval_split_prompts(target, tokenizer)
    else:
        prompt_ids = [render(tokenizer, item["instruction"], target.cfg.data.system_prompt) for item in items]
    info(f"generating {len(items)} responses with {target.describe()}")
    model = load_target_model(target)
    responses = generate_responses(
        model, tokenizer, prompt_ids, max_new_tokens, temperature, target.cfg.train.eval_batch_size,
        target.cfg.train.seed, progress=lambda done, total: print(f"  {done}/{total}", file=sys.stderr, flush=True),
        top_p=top_p)
    records = [{"instruction": item["instruction"], "output": r["text"], "generator": name,
                **({"dataset": item["dataset"]} if "dataset" in item else {})} for item, r in zip(items, responses)]
    write_json(out, records)
    stats = length_stats(responses)
    write_json(stats_path(out), {"generator": name, "model": target.describe(), "max_new_tokens": max_new_tokens,
                                 "temperature": temperature, "top_p": top_p, **stats})
    print_stats(stats, name, max_new_tokens)
    info(f"wrote {out} (AlpacaEval format) and {stats_path(out)}")
    return records
