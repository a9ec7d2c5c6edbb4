"""Generation health: what the model writes as it trains, in figures that show a collapse.

Reward accuracy can reach 1.0 while the model loses its answers to loops ("Ahoy! Ahoy! Ahoy! ...").
At every evaluation a fixed sample of held-out prompts is answered greedily by the live policy, and
the answers are measured:

- ``health/length``: mean response length in tokens, and ``health/length_ratio`` to the first one;
- ``health/no_stop``: share of responses that end without an end-of-turn token (cut at the limit);
- ``health/repetition``: mean share of repeated word 3-grams per response, and ``health/looping``, the
  share of responses above LOOP_SHARE. Repeated n-grams rather than corpus-level distinct-n: a style
  that every answer shares ("Yo-ho-ho!") is what preference tuning is for and must not count, while a
  response repeating itself is the failure. Per response, ``1 - distinct-3`` of that response.
- ``health/answer_recall``: mean share of each pair's key words that the model's answer contains. The
  key words are the content words that the pair's chosen and rejected answers share beyond the prompt
  (what the data agrees any answer should say: "Paris" when both answer "What is the capital of
  France?"), else the chosen answer's. Answers that stay fluent but stop saying anything ("Morocco is
  Morocco's capital.") pass every other figure; this one falls. ``health/answer_recall_change`` is its
  change since the first evaluation.
- ``health/logps_chosen_drift`` and ``health/logps_rejected_drift``: change of the eval average
  log-probs since the first evaluation; both falling is the known SimPO failure.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

LOOP_N = 3
# A response more than this share of whose word 3-grams are repeats is a loop. Measured on the demo's
# health answers (README): ordinary answers 0-0.12; loops ("a romantic partner or a romantic partner of a
# romantic partner", "Ah, yea! Ah, yea! ...") 0.25-0.97. benchmarks/demo_judge.py uses the same rule.
LOOP_SHARE = 0.3
MIN_MEASURED = 4  # health answers with key words needed for health/answer_recall
WORD = re.compile(r"[\w'-]+")
# A key word: a number as written whole ("3.14", "1,440"), else a word; a possessive is its noun.
TERM = re.compile(r"\d+(?:[.,]\d+)+|[\w'-]+")
# Words that carry no fact, left out of a pair's key words.
FUNCTION_WORDS = frozenset("""a an the is are was were be been being am of in on at to for from by with as and or
but not no nor so if then than that this these those it its it's i you he she we they me him her us them my your his
our their what which who whom whose when where why how do does did done have has had having can could will would
shall should may might must there here about into over under up down out off also just very more most some any all
each every other such only own same too""".split())


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def repeated_ngram_share(tokens: list, n: int = LOOP_N) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it: 0 without repeats, near 1 in a loop."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def loops(text: str) -> bool:
    return repeated_ngram_share(words(text)) > LOOP_SHARE


def terms(text: str) -> set[str]:
    """The words and numbers of `text` as key words compare them: lower case, one apostrophe, no
    possessive 's, thousands commas dropped, nothing without a letter or digit."""
    found = TERM.findall(text.lower().replace("\u2019", "'"))
    cleaned = (t.replace(",", "") if t[0].isdigit() else t.removesuffix("'s").strip("'-") for t in found)
    return {t for t in cleaned if any(c.isalnum() for c in t)}


def key_words(question: str, chosen: str, rejected: str) -> set[str]:
    """What an answer to `question` should say, by the pair: the content words both answers share beyond
    the question's, else the chosen answer's (when the two share none, the preference is the substance).
    Whether the answer says them, not whether what it says is true: "not Paris" says "paris"."""
    asked = terms(question)
    content = lambda text: {w for w in terms(text) if w not in FUNCTION_WORDS and w not in asked}  # noqa: E731
    mine = content(chosen)
    return (mine & content(rejected)) or mine


def recall(answer: str, keys: set[str]) -> float:
    """The share of `keys` (not empty) that `answer` says."""
    return len(keys & terms(answer)) / len(keys)


@dataclass
class HealthPrompts:
    ids: list[list[int]]    # the templated prompt tokens, as training saw them
    questions: list[str]    # the user's message, for samples.jsonl
    keys: list[set[str]] = field(default_factory=list)  # each pair's key words (key_words); none: no recall


def pick_prompts(eval_dataset, count: int, seed: int, tokenizer) -> HealthPrompts | None:
    """A fixed, seeded sample of the held-out prompts (the same at every evaluation and on resume)."""
    import numpy as np

    if eval_dataset is None or count == 0 or len(eval_dataset) == 0:
        return None
    # Distinct prompts: the pairs of one prompt would be the same question asked twice.
    questions, picked = eval_dataset["question"], {}
    for i in np.random.default_rng([seed, 14]).permutation(len(eval_dataset)).tolist():
        if len(picked) == count:
            break
        picked.setdefault(questions[i] or i, i)
    rows = [eval_dataset[i] for i in sorted(picked.values())]
    response = lambda row, side: tokenizer.decode(row[f"{side}_input_ids"][row["prompt_length"]:],  # noqa: E731
                                                  skip_special_tokens=True)
    return HealthPrompts(ids=[row["chosen_input_ids"][:row["prompt_length"]] for row in rows],
                         questions=[row["question"] for row in rows],
                         keys=[key_words(row["question"], response(row, "chosen"), response(row, "rejected"))
                               for row in rows])


def generate_answers(model, tokenizer, prompts: HealthPrompts, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy answers of the model as it is now; its train/eval mode is restored after.

    Greedy decoding draws no random numbers and eval mode turns dropout off, so a run with health
    checks takes the same steps as one without, and resumes exactly.
    """
    import torch

    from simpo_lite.generate import generate_responses

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return generate_responses(model, tokenizer, prompts.ids, max_new_tokens, temperature=0.0,
                                      batch_size=batch_size, seed=0)
    finally:
        model.train(was_training)


def health_metrics(answers: list[dict], keys: list[set[str]] | None = None) -> dict[str, float]:
    shares = [repeated_ngram_share(words(a["text"])) for a in answers]
    n = max(len(answers), 1)
    metrics = {"health/length": sum(a["tokens"] for a in answers) / n,
               "health/no_stop": sum(a["truncated"] for a in answers) / n,
               "health/repetition": sum(shares) / n,
               "health/looping": sum(s > LOOP_SHARE for s in shares) / n}
    recalls = [recall(a["text"], k) for a, k in zip(answers, keys or []) if k]
    if len(recalls) >= min(MIN_MEASURED, len(answers)):  # on fewer, one answer would swing the mean
        metrics["health/answer_recall"] = sum(recalls) / len(recalls)
    return metrics


def add_drift(metrics: dict, first: dict | None, eval_record: dict, first_eval: dict | None) -> dict:
    """Figures relative to the first evaluation: length ratio and the log-prob drifts."""
    out = dict(metrics)
    if first:
        out["health/length_ratio"] = metrics["health/length"] / max(first["health/length"], 1e-9)
        if "health/answer_recall" in metrics and "health/answer_recall" in first:
            out["health/answer_recall_change"] = metrics["health/answer_recall"] - first["health/answer_recall"]
    if first_eval:
        for side in ("chosen", "rejected"):
            out[f"health/logps_{side}_drift"] = eval_record[f"eval_logps/{side}"] - first_eval[f"eval_logps/{side}"]
    return out


def collapse_signs(record: dict, limits) -> list[str]:
    """One line per guardrail crossed: the metric, its value, the step. `limits` is the TrainConfig."""
    step, signs = record["step"], []

    def over(key: str, limit: float, what: str) -> None:
        value = record.get(key)
        if value is not None and value > limit:
            signs.append(f"{key} {value:.2f} at step {step} (limit {limit:g}: {what})")

    over("health/looping", limits.collapse_looping, "share of answers that repeat themselves")
    over("health/length_ratio", limits.collapse_length_ratio, "mean answer length against step 0")
    change = record.get("health/answer_recall_change")
    if change is not None and -change > limits.collapse_recall_drop:
        now = record["health/answer_recall"]
        signs.append(f"health/answer_recall fell by {-change:.2f}, from {now - change:.2f} to {now:.2f}, at step {step} "
                     f"(limit {limits.collapse_recall_drop:g}: the answers stopped saying their pairs' key words)")
    chosen, rejected = record.get("health/logps_chosen_drift"), record.get("health/logps_rejected_drift")
    if chosen is not None and rejected is not None and chosen < -limits.collapse_logps_drop and rejected < 0:
        signs.append(f"health/logps_chosen_drift {chosen:.2f} at step {step} with rejected falling too "
                     f"({rejected:.2f}; limit -{limits.collapse_logps_drop:g} nats per token)")
    return signs


def recall_note(first_record: dict, limits, run_dir) -> str | None:
    """At step 0: a line when health/answer_recall cannot see a collapse on this data, unmeasured (too few
    prompts with key words) or already below the fall its limit waits for (long answers rarely repeat
    their pair's words)."""
    if "health/length" not in first_record:
        return None
    value = first_record.get("health/answer_recall")
    if value is None:
        return (f"note: health/answer_recall is not measured: fewer than {MIN_MEASURED} health prompts have key words "
                f"(words their pairs' answers say); loops and length are still watched")
    if value <= limits.collapse_recall_drop:
        return (f"note: health/answer_recall is {value:.2f} at step 0, so it cannot fall by train.collapse_recall_drop "
                f"({limits.collapse_recall_drop:g}): on answers like these it will not flag lost content; read them: "
                f"simpo-lite report {run_dir}")
    return None


def crossed_limits(records: list[dict], limits) -> list[str]:
    """Every limit the evaluations among `records` crossed, in order (collapse_signs of each)."""
    return [sign for record in records if "eval_loss" in record for sign in collapse_signs(record, limits)]


def crossed_line(signs: list[str]) -> str:
    """One line for every limit a run's evaluations crossed: the first, and how many more."""
    more = f" (and {len(signs) - 1} more)" if len(signs) > 1 else ""
    return f"warning: generation health crossed its limits: {signs[0]}{more}"


def advice(cfg, run_dir) -> str:
    """What to try after a collapse, with this run's values and the commands that do it."""
    lr, sft, run = cfg.train.learning_rate, cfg.simpo.sft_weight, str(run_dir).rstrip("/")
    again = f"--config {run}/config.yaml"
    return (f"read the answers: simpo-lite report {run}; then lower train.learning_rate (the SimPO authors' "
            f"first advice; {lr:g} now: simpo-lite train {again} --output-dir {run}-lr --set "
            f"train.learning_rate={lr / 3:.1g}, or find one: simpo-lite sweep {again} --grid "
            f"'train.learning_rate=[{lr / 10:.1g},{lr / 3:.1g}]' --max-steps {min(cfg.train.max_steps or 50, 50)} "
            f"--output-dir {run}-sweep), raise simpo.sft_weight (the NLL term on the chosen answers; {sft:g} now), "
            f"or train fewer steps")


def summary_line(record: dict) -> str:
    """The figures the progress line shows after an evaluation."""
    parts = [f"answers: {record['health/length']:.0f} tokens"]
    if "health/length_ratio" in record:
        parts[0] += f" (x{record['health/length_ratio']:.2f})"
    parts.append(f"looping {record['health/looping']:.0%}")
    parts.append(f"no end-of-turn {record['health/no_stop']:.0%}")
    if "health/answer_recall" in record:
        change = record.get("health/answer_recall_change")
        parts.append(f"key words said {record['health/answer_recall']:.2f}"
                     + (f" ({change:+.2f})" if change is not None else ""))
    if "health/logps_chosen_drift" in record:
        parts.append(f"logps/chosen {record['health/logps_chosen_drift']:+.2f}")
    return ", ".join(parts)


SHOWN = ("health/length", "health/looping", "health/no_stop", "health/repetition", "health/answer_recall",
         "health/logps_chosen_drift")


class HealthMonitor:
    """Generation health of one run: the fixed prompts, the first evaluation's figures to compare with,
    the guardrails, and which checkpoint was the last one saved while the run was healthy."""

    def __init__(self, prompts: HealthPrompts | None, train_cfg, previous_evals: list[dict]):
        self.prompts = prompts
        self.cfg = train_cfg
        self.first_eval = previous_evals[0] if previous_evals else None
        self.first = self.first_eval if self.first_eval and "health/length" in self.first_eval else None
        # A resumed run was healthy at its checkpoint if the last evaluation before it crossed no limit.
        self.healthy = not (previous_evals and collapse_signs(previous_evals[-1], train_cfg))
        self.last_healthy_checkpoint = None

    def measure(self, record: dict, model, tokenizer) -> tuple[dict, list[dict]]:
        """(the eval record with health/... added, the samples to write)."""
        if self.prompts is None:
            return record, []
        # One batch: each step of greedy decoding costs about the same for 1 or 8 short prompts (on the
        # CPU every forward dequantizes all 4-bit weights).
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, self.prompts, self.cfg.health_max_new_tokens,
                                   batch_size=len(self.prompts.ids))
        health = add_drift(health_metrics(answers, self.prompts.keys), self.first, record, self.first_eval)
        health["health/seconds"] = time.perf_counter() - started  # what the check costs, per evaluation
        samples = [{"step": record["step"], "prompt": q, "output": a["text"]}
                   for q, a in zip(self.prompts.questions, answers)]
        return {**record, **health}, samples

    def judge(self, record: dict) -> list[str]:
        """The guardrails crossed by this evaluation; remembers the first one as the baseline."""
        if self.first_eval is None:
            self.first_eval = record
            self.first = record if "health/length" in record else None
        signs = collapse_signs(record, self.cfg)
        self.healthy = not signs
        return signs

    def saved(self, checkpoint) -> None:
        if self.healthy:
            self.last_healthy_checkpoint = checkpoint
