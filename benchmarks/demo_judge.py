"""Judge a demo run by what it writes: fact / style / loop rates on the run's held-out demo prompts.

For a run folder this generates greedy answers (64 new tokens by default) to the prompts the run held
out (data.eval_fraction of the demo set, the run's own seed: the same split `simpo-lite train` evaluates
on) with

  base       the 4-bit NF4 base model, loaded as the run's step 0 saw it (simpo_lite.model.load_for_inference)
  run        the run as trained: 4-bit base + the saved LoRA adapter (simpo_lite.target, as `simpo-lite
             generate RUN` loads it)
  export     a merged export folder (plain transformers, as `simpo-lite generate FOLDER` loads it), with
             --export FOLDER
  merged-fp32      (--merge original) the adapter merged in memory into the original full-precision base
                   weights, as `simpo-lite export` does today, then loaded like an export
  merged-dequant   (--merge dequantized) the adapter merged in memory into the dequantized NF4 base
                   weights (simpo_lite.dequantize), then loaded like an export

and judges every answer by rule:

  fact   the answer states the row's `answer` (demo.py): case-insensitive, accents ignored; numbers
         match as digits or in words ("24", "twenty-four", "twenty four"); other answers match at the
         whole words, or word prefixes when the answer ends in "*" ("butterfl*"); "|" separates accepted
         alternatives; an answer the prompt itself contains must occur more often in the response.
  style  the answer carries at least one pirate marker (PIRATE_MARKERS): an opener (Arr, Ahoy, Avast,
         Yarr, Shiver me timbers), the sign-off Yo-ho-ho, an address (matey, me hearty, me bucko,
         landlubber) or a pirate word (th', o', be-for-is is not counted: "be" is ordinary English).
  loop   simpo_lite.health's rule: repeated_ngram_share(words, 3) > LOOP_SHARE: more than that share of the answer's word
         3-grams already occurred earlier in the same answer.

Prints a table and three before/after examples, writes JSON (--out, default RUN/demo_judge.json).
Base answers are cached (--base-cache) since they do not depend on the run.

    PYTHONPATH=. python benchmarks/demo_judge.py runs/smollm2-demo --merge original dequantized
    PYTHONPATH=. python benchmarks/demo_judge.py runs/smollm2-demo --export runs/smollm2-demo/merged
    PYTHONPATH=. python benchmarks/demo_judge.py --screen     # the 4-bit base on every demo prompt
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

from simpo_lite.health import LOOP_SHARE

MAX_NEW_TOKENS = 64
# Word-level patterns (lowercased text); any one of them marks the pirate style.
PIRATE_MARKERS = [r"\barr+\b", r"\bahoy\b", r"\bavast\b", r"\byarr+\b", r"\bshiver me timbers\b",
                  r"\byo-ho-ho\b", r"\byo ho ho\b", r"\bmatey\b", r"\bme hearty\b", r"\bhearties\b",
                  r"\bme bucko\b", r"\blandlubbers?\b", r"\bth'", r"\bo'(?=\s)"]

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


# ---- the rule-based judge -------------------------------------------------------------------------

def number_words(n: int) -> list[str]:
    """English spellings of 0 <= n < 10000, hyphens written as spaces: 101 -> ['one hundred one',
    'one hundred and one', 'a hundred and one', ...]."""
    if n < 20:
        return [_UNITS[n]]
    if n < 100:
        return [_TENS[n // 10] + ("" if n % 10 == 0 else " " + _UNITS[n % 10])]
    big, unit = (n // 1000, "thousand") if n >= 1000 else (n // 100, "hundred")
    rest = n % 1000 if n >= 1000 else n % 100
    heads = [f"{w} {unit}" for w in number_words(big)] + ([f"a {unit}"] if big == 1 else [])
    if rest == 0:
        return heads
    return [f"{h}{sep}{r}" for h in heads for sep in (" ", " and ") for r in number_words(rest)]


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"\s+", " ", text.replace("-", " ").replace("\u2019", "'"))


def _count(text: str, alternative: str) -> int:
    """Occurrences of one accepted alternative in normalised text."""
    if alternative.isdigit():
        n = int(alternative)
        digits = len(re.findall(rf"(?<![\d.]){n}(?!\d|\.\d)", text.replace(",", "")))
        return digits + sum(len(re.findall(rf"\b{re.escape(w)}\b", text)) for w in number_words(n))
    if alternative.endswith("*"):  # a prefix: "butterfl*" matches butterfly and butterflies
        return len(re.findall(rf"\b{re.escape(normalise(alternative[:-1]))}", text))
    return len(re.findall(rf"\b{re.escape(normalise(alternative))}\b", text))


INTERJECTION_WORDS = {"arr", "arrr", "ahoy", "avast", "yarr", "yarrr", "shiver", "me", "timbers", "yo", "ho",
                      "matey", "hearty", "hearties", "bucko", "ye", "landlubber", "there", "oh", "well", "sure"}


def first_statement(response: str) -> str:
    """The first sentence that says something: sentences made only of interjections ("Arr, matey!",
    "Yo-ho-ho!", "Sure!") are skipped. Sentences end at . ! ? or a line break followed by a space."""
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", response.strip()):
        if any(w not in INTERJECTION_WORDS for w in re.findall(r"[a-z0-9]+", sentence.lower())):
            return sentence
    return ""


def states_fact_anywhere(response: str, answer: str, prompt: str = "") -> bool:
    """Whether `response` states `answer` (see the module docstring). An alternative that the prompt
    itself contains ("What is 46 minus 23?" -> 23; "plural of fish?" -> fish) must occur more often in
    the response than in the prompt, so that echoing the question does not count."""
    text, asked = normalise(response), normalise(prompt)
    return any(_count(text, alt.strip()) > _count(asked, alt.strip()) for alt in answer.split("|"))


def states_fact(response: str, answer: str, prompt: str = "") -> bool:
    """The fact, in the answer's first statement: a rambling answer that reaches the right word after a
    wrong one ("The opposite of summer is fall. Fall is the season of winter") does not count."""
    return states_fact_anywhere(first_statement(response), answer, prompt)


def pirate_style(response: str) -> bool:
    text = response.lower().replace("\u2019", "'")
    return any(re.search(p, text) for p in PIRATE_MARKERS)


def judge(response: str, answer: str, prompt: str = "") -> dict:
    from simpo_lite.health import repeated_ngram_share, words  # the rule generation health uses

    share = repeated_ngram_share(words(response))
    return {"fact": states_fact(response, answer, prompt),
            "fact_anywhere": states_fact_anywhere(response, answer, prompt), "style": pirate_style(response),
            "loop": share > LOOP_SHARE, "repeated_3gram_share": round(share, 3)}


def rates(judged: list[dict]) -> dict:
    n = len(judged)
    return {key: sum(j[key] for j in judged) / n for key in ("fact", "fact_anywhere", "style", "loop")} | {"n": n}


# ---- prompts ----------------------------------------------------------------------------------------

def demo_rows(source: str = "demo") -> list[dict]:
    """The rows of the demo asset, or of a .jsonl file in the same format (prompt, answer, family)."""
    from simpo_lite.data.sources import demo_path

    path = demo_path() if source == "demo" else Path(source)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not all("answer" in row and "family" in row for row in rows):
        raise SystemExit(f"{path}: every row needs 'answer' and 'family' (simpo_lite/data/demo.py writes them)")
    return rows


def held_out_rows(cfg, tokenizer) -> list[dict]:
    """The rows the run held out, in split order (the trainer's own split function and seed)."""
    from simpo_lite.data import build_datasets

    if not (cfg.data.source == "demo" or cfg.data.source.endswith(".jsonl")):
        raise SystemExit(f"the run trained on {cfg.data.source!r}, not the demo set")
    prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    rows = demo_rows(cfg.data.source)
    return [rows[i] for i in prepared.eval["row"]]


# ---- models -----------------------------------------------------------------------------------------

def answers(model, tokenizer, cfg, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    from simpo_lite.generate import generate_responses, render

    ids = [render(tokenizer, p, cfg.data.system_prompt) for p in prompts]
    model.eval()
    out = generate_responses(model, tokenizer, ids, max_new_tokens, 0.0, batch_size, cfg.train.seed)
    return [r["text"] for r in out]


def free(*objects) -> None:
    for obj in objects:
        del obj
    gc.collect()


def base_answers(cfg, tokenizer, prompts, max_new_tokens, batch_size, cache: Path | None) -> list[str]:
    """The 4-bit base's answers, from the cache where it has them."""
    from simpo_lite.model import compute_dtype, load_for_inference

    m = cfg.model
    key = hashlib.sha256(json.dumps([m.name_or_path, m.revision, m.quantize, m.double_quant, str(compute_dtype(m)),
                                     cfg.data.system_prompt, max_new_tokens]).encode()).hexdigest()[:16]
    stored = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    known = stored.get(key, {})
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        model = load_for_inference(cfg)  # as the run's step 0 saw it
        chunk = 4 * batch_size  # saved as it goes: a long screen that is stopped keeps what it did
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            known.update(zip(part, answers(model, tokenizer, cfg, part, max_new_tokens, batch_size)))
            print(f"  base: {min(start + chunk, len(missing))}/{len(missing)} new prompts", file=sys.stderr, flush=True)
            if cache:
                stored[key] = known
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(stored, indent=1, ensure_ascii=False))
        free(model)
    return [known[p] for p in prompts]


def merged_in_memory(cfg, adapter_dir: Path, into: str):
    """The adapter merged in fp32 into the original weights or the dequantized NF4 weights, then cast
    to the compute dtype: what loading an fp32 export folder with `simpo-lite generate` gives."""
    from dataclasses import replace

    import torch
    from peft import PeftModel

    from simpo_lite.merge import merge_base
    from simpo_lite.model import compute_dtype

    base = merge_base(replace(cfg, export=replace(cfg.export, merge_into=into)), torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    return merged.to(compute_dtype(cfg.model)).eval()


# ---- the report -------------------------------------------------------------------------------------

def print_table(results: dict) -> None:
    print(f"\n{'model':<16} {'n':>4} {'fact':>6} {'style':>6} {'loop':>6} {'fact anywhere':>14}")
    for name, r in results.items():
        s = r["rates"]
        print(f"{name:<16} {s['n']:>4} {s['fact']:>6.2f} {s['style']:>6.2f} {s['loop']:>6.2f} {s['fact_anywhere']:>14.2f}")


def print_examples(rows, results: dict, count: int = 3) -> None:
    names = list(results)
    # One example from each of the first `count` families, so they differ.
    picked, families = [], set()
    for i, row in enumerate(rows):
        if row["family"] not in families:
            families.add(row["family"])
            picked.append(i)
        if len(picked) == count:
            break
    for i in picked:
        print(f"\n{rows[i]['prompt']}  (answer: {rows[i]['answer']})")
        for name in names:
            j = results[name]["answers"][i]
            flags = "".join(k[0].upper() if j[k] else "." for k in ("fact", "style", "loop"))
            print(f"  {name:<15} [{flags}] {j['text']!r}")


def print_fact_changes(results: dict) -> None:
    """Every held-out prompt whose fact a tuned model lost or gained against the base, with both answers."""
    base = results["base"]["answers"]
    for name, r in results.items():
        if name == "base":
            continue
        for b, j in zip(base, r["answers"]):
            if b["fact"] != j["fact"]:
                change = "lost" if b["fact"] else "gained"
                print(f"  {name} {change}: {j['prompt']} (answer: {j['answer']})  base {b['text']!r}  {name} {j['text']!r}")


# A fact the base prefers over the runner-up by less than this (nats) flips with any nudge: tuning's, or
# a CPU's rounding (Zambia: "Lusaka" 0.41 against "Lusat(ina)" 0.34, lost by every tuned run tried).
FIRM_MARGIN = 0.5


def fact_span(sentence: str, answer: str) -> tuple[int, int]:
    """(start, length) of the last accepted alternative in the sentence (numbers also in words,
    hyphenated or not); (-1, 0) when none occurs."""
    low, best = sentence.lower(), (-1, 0)
    for alt in (a.strip().rstrip("*") for a in answer.split("|")):
        forms = [alt] + (number_words(int(alt)) if alt.isdigit() else [])
        for form in {f for w in forms for f in (w, w.replace(" ", "-"))}:
            start = low.rfind(form.lower())
            if start > best[0]:
                best = (start, len(form))
    return best


def fact_margins(model, tokenizer, cfg, rows: list[dict]) -> list[float | None]:
    """Per row, teacher-forced on its plain sentence after the chat-templated prompt: the smallest margin
    (nats) by which the base prefers a token of the fact over its runner-up there; None when the sentence
    does not contain the answer."""
    import torch

    from simpo_lite.data.demo import plain_sentence
    from simpo_lite.generate import render
    from simpo_lite.target import model_device

    margins = []
    for row in rows:
        sentence = plain_sentence(row)
        start, length = fact_span(sentence, row["answer"])
        prompt = render(tokenizer, row["prompt"], cfg.data.system_prompt)
        encoded = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
        ids = prompt + encoded["input_ids"]
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([ids], device=model_device(model))).logits[0].float().log_softmax(-1)
        row_margins = []
        for k, (a, b) in enumerate(encoded["offset_mapping"]):
            if start < 0 or b <= start or a >= start + length:
                continue
            scores = logps[len(prompt) + k - 1].clone()  # the position that predicts token k
            target = scores[encoded["input_ids"][k]].item()
            scores[encoded["input_ids"][k]] = float("-inf")
            row_margins.append(target - scores.max().item())
        margins.append(min(row_margins) if row_margins else None)
    return margins


def write_screen(judged: list[dict], infirm: list[str], cfg, max_new_tokens: int) -> None:
    from simpo_lite.data.demo import screened_out_path
    from simpo_lite.model import compute_dtype

    wrong = [j["prompt"] for j in judged if not j["fact"]]
    dtype = str(compute_dtype(cfg.model)).replace("torch.", "")
    lines = ["# Demo candidates left out of the demo set (simpo_lite/data/demo.py), measured by",
             f"# benchmarks/demo_judge.py --screen: {cfg.model.name_or_path}, 4-bit NF4, compute {dtype}.",
             f"# Answered wrongly (greedy, {max_new_tokens} new tokens): {len(wrong)} of {len(judged)} candidates.",
             *wrong,
             f"# Answered rightly, but a token of the fact is preferred by under {FIRM_MARGIN} nats in the row's own "
             f"plain sentence: {len(infirm)} more.",
             *infirm]
    screened_out_path().write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {screened_out_path()}: {len(wrong) + len(infirm)} of {len(judged)} candidates left out",
          file=sys.stderr)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="run folder (config.yaml + adapter/)")
    parser.add_argument("--export", help="a merged export folder to judge too")
    parser.add_argument("--merge", nargs="*", default=[], choices=["original", "dequantized"],
                        help="also judge the adapter merged in memory into these base weights")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="JSON file (default RUN/demo_judge.json)")
    parser.add_argument("--base-cache", default="runs/demo_judge_base_cache.json")
    parser.add_argument("--screen", action="store_true", help="judge only the 4-bit base, on every demo prompt")
    parser.add_argument("--write-screen", action="store_true",
                        help="with --screen: write the prompts the base got wrong to assets/demo_screened_out.txt")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config overrides, as for train")
    args = parser.parse_args(argv)

    from simpo_lite.config import resolve
    from simpo_lite.target import load_target_model, load_target_tokenizer, resolve_target

    cache = Path(args.base_cache) if args.base_cache else None
    timings = {}
    if args.screen:
        cfg = resolve(None, sets=args.sets)
        from simpo_lite.model import load_tokenizer
        tokenizer = load_tokenizer(cfg.model)
        from simpo_lite.data.demo import generate_demo_rows
        rows = generate_demo_rows(screened=False)  # every candidate
    else:
        target = resolve_target(args.run, sets=args.sets)
        cfg = target.cfg
        tokenizer = load_target_tokenizer(target)
        rows = held_out_rows(cfg, tokenizer)
    prompts = [r["prompt"] for r in rows]
    texts = {}
    t = time.time()
    texts["base"] = base_answers(cfg, tokenizer, prompts, args.max_new_tokens, args.batch_size, cache)
    timings["base"] = time.time() - t
    if not args.screen:
        t = time.time()
        model = load_target_model(target)
        texts["run"] = answers(model, tokenizer, cfg, prompts, args.max_new_tokens, args.batch_size)
        free(model)
        timings["run"] = time.time() - t
        if args.export:
            t = time.time()
            export = resolve_target(args.export)
            model = load_target_model(export)
            texts["export"] = answers(model, load_target_tokenizer(export), export.cfg, prompts,
                                      args.max_new_tokens, args.batch_size)
            free(model)
            timings["export"] = time.time() - t
        for into in args.merge:
            t = time.time()
            name = {"original": "merged-fp32", "dequantized": "merged-dequant"}[into]
            model = merged_in_memory(cfg, target.adapter_dir, into)
            texts[name] = answers(model, tokenizer, cfg, prompts, args.max_new_tokens, args.batch_size)
            free(model)
            timings[name] = time.time() - t
    results = {}
    for name, outs in texts.items():
        judged = [{"prompt": r["prompt"], "family": r["family"], "answer": r["answer"], "text": o, **judge(o, r["answer"], r["prompt"])}
                  for r, o in zip(rows, outs)]
        results[name] = {"rates": rates(judged), "answers": judged}
    print_table(results)
    if args.screen:
        by_family = {}
        for j in results["base"]["answers"]:
            by_family.setdefault(j["family"], []).append(j["fact"])
        for family, facts in sorted(by_family.items()):
            print(f"  base fact rate {family:<14} {sum(facts) / len(facts):.2f} of {len(facts)}")
        from simpo_lite.model import load_for_inference

        right = [r for r, j in zip(rows, results["base"]["answers"]) if j["fact"]]
        model = load_for_inference(cfg)
        margins = fact_margins(model, tokenizer, cfg, right)
        free(model)
        infirm = [r["prompt"] for r, m in zip(right, margins) if m is None or m < FIRM_MARGIN]
        print(f"  {len(infirm)} of the {len(right)} right answers hold a token of the fact by under {FIRM_MARGIN} nats")
        if args.write_screen:
            write_screen(results["base"]["answers"], infirm, cfg, args.max_new_tokens)
    else:
        print_examples(rows, results)
        print_fact_changes(results)
    out = Path(args.out) if args.out else (Path("runs/demo_judge_screen.json") if args.screen
                                           else Path(args.run) / "demo_judge.json")
    summary = {"run": args.run, "max_new_tokens": args.max_new_tokens, "loop_threshold": LOOP_SHARE,
               "seconds": {k: round(v, 1) for k, v in timings.items()},
               "rates": {k: v["rates"] for k, v in results.items()}, "models": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}  (seconds: {summary['seconds']})", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
