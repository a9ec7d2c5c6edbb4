"""Generation health: the figures by hand, on a tiny model forced to loop, and inside a training run."""

import json
import subprocess
import sys

import pytest
import torch

from simpo_lite.config import TrainConfig
from simpo_lite.health import (HealthMonitor, HealthPrompts, add_drift, collapse_signs, generate_answers,
                               health_metrics, key_words, loops, recall, repeated_ngram_share, words)
from tiny_models import random_llama, smollm2_tokenizer, tiny_llama_config, tiny_model_folder, write_config, write_pairs


def test_repeated_ngram_share_by_hand():
    # a b c a b c a b c: 7 trigrams (abc bca cab abc bca cab abc), 3 distinct: 1 - 3/7
    assert repeated_ngram_share(list("abcabcabc")) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_share(words("The capital of Peru is Lima.")) == 0.0
    assert repeated_ngram_share(["too", "short"]) == 0.0
    assert loops("A perro! Ahoy! Ahoy! Ahoy! Ahoy! Ahoy! Ahoy! Ahoy!")
    assert not loops("Arr! Th' capital o' Peru be Lima, matey! Yo-ho-ho!")


def test_collapse_signs_name_the_metric_value_and_step():
    limits = TrainConfig()
    healthy = {"step": 10, "health/looping": 0.0, "health/length_ratio": 1.4,
               "health/logps_chosen_drift": 0.3, "health/logps_rejected_drift": -2.0}
    assert collapse_signs(healthy, limits) == []
    broken = {"step": 20, "health/looping": 0.75, "health/length_ratio": 4.2,
              "health/logps_chosen_drift": -1.5, "health/logps_rejected_drift": -3.0}
    signs = collapse_signs(broken, limits)
    assert len(signs) == 3
    assert signs[0].startswith("health/looping 0.75 at step 20")
    assert "health/length_ratio 4.20" in signs[1] and "health/logps_chosen_drift -1.50" in signs[2]


def test_key_words_are_what_both_answers_say_else_the_chosen_ones():
    # The demo's pairs: the same fact, signed off as a pirate or as an assistant.
    assert key_words("What is the capital of France?", "The capital of France is Paris. Arr, matey!",
                     "The capital of France is Paris. I hope this helps.") == {"paris"}
    # A user's pairs: a right fact against a ramble with a wrong one; they share nothing beyond the question.
    assert key_words("What is 12 times 5?", "12 times 5 is 60.", "Let me add 12 five times: we get 58.") == {"60"}
    assert key_words("Hi.", "Hi!", "Hello there.") == set()  # nothing to check: left out of the mean


def test_fluent_answers_that_stop_saying_the_facts_cross_the_recall_limit():
    """The answers of an audit's run at learning rate 1e-2 (held-out reward accuracy 1.000 throughout):
    no loop, shorter, no drift of the chosen log-probs; only what they say shows the damage."""
    keys = [{"rabat"}, {"jupiter"}, {"60"}, {"saturn"}]
    before = [{"text": t, "tokens": 9, "truncated": False} for t in (
        "The capital of Morocco is Rabat.", "The largest planet is Jupiter.", "A minute has 60 seconds.",
        "Saturn is the planet best known for its rings.")]
    after = [{"text": t, "tokens": 7, "truncated": False} for t in (
        "Morocco is Morocco's capital.", "Our solar system is composed of several planets.",
        "A minute is a fundamental concept.", "Planetary rings are rings of rings.")]
    first = {"step": 0, **health_metrics(before, keys)}
    assert first["health/answer_recall"] == 1.0
    record = {"step": 6, **add_drift(health_metrics(after, keys), first, {}, None)}
    assert record["health/answer_recall"] == 0.0 and record["health/answer_recall_change"] == -1.0
    assert record["health/looping"] == 0.0
    signs = collapse_signs(record, TrainConfig())
    assert signs == ["health/answer_recall fell by 1.00, from 1.00 to 0.00, at step 6 (limit 0.35: the answers "
                     "stopped saying their pairs' key words)"]
    # One answer of four losing its fact is within the limit.
    one_lost = {"step": 6, **add_drift(health_metrics(before[:3] + after[3:], keys), first, {}, None)}
    assert collapse_signs(one_lost, TrainConfig()) == []


def forced(token_id: int):
    """A tiny model whose every next token is `token_id`: it repeats one word until the limit."""
    tokenizer = smollm2_tokenizer()
    model = random_llama(tiny_llama_config(tokenizer), seed=0)

    def always(module, inputs, output):
        logits = torch.full_like(output, -1e4)
        logits[..., token_id] = 0.0
        return logits

    model.lm_head.register_forward_hook(always)
    return model, tokenizer


def prompts(tokenizer, questions):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"] for q in questions]
    return HealthPrompts(ids=ids, questions=list(questions))


def test_a_model_forced_to_repeat_itself_reads_as_looping():
    tokenizer = smollm2_tokenizer()
    word = tokenizer(" Ahoy", add_special_tokens=False)["input_ids"][0]  # " Ah": "Ahoy" is two tokens
    model, tokenizer = forced(word)
    model.train()
    answers = generate_answers(model, tokenizer, prompts(tokenizer, ["What is 2 plus 2?", "Name a colour."]),
                               max_new_tokens=12, batch_size=2)
    assert model.training  # restored after generating
    assert all(a["tokens"] == 12 and a["truncated"] for a in answers)
    assert answers[0]["text"].split()[:3] == ["Ah", "Ah", "Ah"]
    metrics = health_metrics(answers)
    assert metrics == {"health/length": 12.0, "health/no_stop": 1.0,
                       "health/repetition": pytest.approx(1 - 1 / 10), "health/looping": 1.0}


def test_a_model_that_ends_its_turn_is_healthy():
    tokenizer = smollm2_tokenizer()
    model, tokenizer = forced(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    answers = generate_answers(model, tokenizer, prompts(tokenizer, ["Hi."]), max_new_tokens=12, batch_size=1)
    assert health_metrics(answers) == {"health/length": 0.0, "health/no_stop": 0.0, "health/repetition": 0.0,
                                       "health/looping": 0.0}


def test_monitor_compares_with_the_first_evaluation_and_remembers_healthy_checkpoints():
    tokenizer = smollm2_tokenizer()
    model, tokenizer = forced(tokenizer(" Ahoy", add_special_tokens=False)["input_ids"][0])
    monitor = HealthMonitor(prompts(tokenizer, ["Hi."]), TrainConfig(health_max_new_tokens=8), previous_evals=[])
    first = {"step": 0, "eval_logps/chosen": -1.0, "eval_logps/rejected": -1.2, "health/length": 4.0}
    assert monitor.judge(first) == []
    monitor.saved("checkpoint-0")
    record, samples = monitor.measure({"step": 5, "eval_logps/chosen": -2.5, "eval_logps/rejected": -3.0},
                                      model, tokenizer)
    assert [(s["step"], s["prompt"]) for s in samples] == [(5, "Hi.")]
    assert samples[0]["output"].startswith("Ah Ah")
    assert record["health/length_ratio"] == pytest.approx(8 / 4)
    assert record["health/logps_chosen_drift"] == pytest.approx(-1.5)
    signs = monitor.judge(record)
    assert any(s.startswith("health/looping 1.00 at step 5") for s in signs)
    assert any("health/logps_chosen_drift -1.50" in s for s in signs)
    monitor.saved("checkpoint-5")
    assert monitor.last_healthy_checkpoint == "checkpoint-0"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("health-run")
    model, data = tiny_model_folder(root / "model", tie=True, sharpen=True), write_pairs(root / "pairs.jsonl", 20)
    config = write_config(root / "c.yaml", model, data, root / "run", max_steps=4, eval_steps=2,
                          health_prompts=4, health_max_new_tokens=10)
    result = subprocess.run([sys.executable, "-m", "simpo_lite", "train", "--config", str(config), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result.stderr, result.stdout


def test_every_evaluation_measures_and_writes_what_the_model_wrote(tiny_run):
    run, stderr, _ = tiny_run
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("health/length", "health/no_stop", "health/repetition", "health/looping", "health/answer_recall"):
        assert all(key in r for r in evals), key
    assert "health/answer_recall_change" in evals[-1]
    assert "health/length_ratio" not in evals[0] and "health/logps_chosen_drift" in evals[-1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 4 + [2] * 4 + [4] * 4
    assert {s["prompt"] for s in samples} <= {f"Tell me about {w} number {i}." for w in
                                              ["apple", "river", "stone", "cloud", "green", "seven", "quiet", "maple",
                                               "ocean", "lamp"] for i in range(20)}
    assert "answers:" in stderr and "looping" in stderr  # the progress line shows the key figures
    summary = json.loads((run / "summary.json").read_text())
    assert "health/length" in summary["end_eval"]


def test_report_prints_first_and_last_answers_side_by_side(tiny_run):
    from simpo_lite.run_report import samples_side_by_side

    run, _, _ = tiny_run
    rows = samples_side_by_side(run)
    assert len(rows) == 4 and all(len(row) == 3 for row in rows)
    out = subprocess.run([sys.executable, "-m", "simpo_lite", "report", str(run)], capture_output=True, text=True)
    assert out.returncode == 0 and "step 0" in out.stdout and "step 4" in out.stdout
    assert "generation health at step 4" in out.stdout


def test_the_end_of_training_shows_what_the_model_writes_before_and_after(tiny_run):
    from simpo_lite.run_report import samples_side_by_side

    run, _, stdout = tiny_run
    lines = stdout.splitlines()  # piped: plain tab-separated rows under a '# title' line
    title = next(i for i, line in enumerate(lines) if line.startswith("# what the model wrote"))
    assert "3 of 4 held-out prompts" in lines[title]
    assert lines[title + 1].split("\t") == ["prompt", "step 0", "step 4"]
    shown = [line.split("\t")[0] for line in lines[title + 2:title + 5]]
    assert shown == [prompt for prompt, _, _ in samples_side_by_side(run)[:3]]
    assert lines[title + 5] == f"all 4 answers and the curves: simpo-lite report {run}"
    assert lines[title + 6].startswith("adapter saved to")  # the next command comes last


def test_key_words_read_numbers_whole_and_possessives_as_their_noun():
    assert key_words("What is pi to two decimals?", "Pi is about 3.14.", "Pi is 3, roughly.") == {"3.14"}
    assert recall("It is 12.5.", {"12"}) == 0.0  # a number is compared whole
    assert key_words("Who wrote Hamlet?", "It’s by Shakespeare.", "Shakespeare's, I think.") == {"shakespeare"}
    assert recall("A day has 1,440 minutes.", {"1440"}) == 1.0
    assert key_words("List two.", "- one\n- two", "- uno\n- dos") == {"one"}  # a dash is no key word


def test_recall_needs_enough_prompts_with_key_words_and_says_when_it_cannot_fall_far_enough():
    from simpo_lite.health import recall_note

    answers = [{"text": "Paris.", "tokens": 2, "truncated": False}] * 8
    assert "health/answer_recall" not in health_metrics(answers, [{"paris"}] * 3 + [set()] * 5)
    assert health_metrics(answers, [{"paris"}] * 4 + [set()] * 4)["health/answer_recall"] == 1.0
    limits = TrainConfig()
    assert recall_note({"health/length": 9.0, "health/answer_recall": 0.9}, limits, "runs/x") is None
    low = recall_note({"health/length": 9.0, "health/answer_recall": 0.13}, limits, "runs/x")
    assert low.startswith("note: health/answer_recall is 0.13 at step 0, so it cannot fall by") and "runs/x" in low
    assert "not measured" in recall_note({"health/length": 9.0}, limits, "runs/x")
