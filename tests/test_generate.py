import json

import pytest

from simpo_lite.errors import UserError
from simpo_lite.generate import decode_answer, generate_command, length_stats, read_prompts, render, stats_path
from tiny_models import smollm2_tokenizer, tiny_model_folder, tiny_run_folder


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", sharpen=True)


def test_read_prompts_accepts_alpacaeval_jsonl_and_strings(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a fruit.", "dataset": "helpful_base", "output": "x"},
                                  "Say hi.", {"prompt": "Count to 3."}]))
    assert read_prompts(alpaca) == [{"instruction": "Name a fruit.", "dataset": "helpful_base"},
                                    {"instruction": "Say hi."}, {"instruction": "Count to 3."}]
    lines = tmp_path / "arena.jsonl"
    lines.write_text('{"question_id": "a", "turns": [{"content": "Explain RAM."}]}\n\n{"instruction": "Hi"}\n')
    assert [p["instruction"] for p in read_prompts(lines)] == ["Explain RAM.", "Hi"]


@pytest.mark.parametrize("content, name, fragment", [
    ('[{"question": "q"}]', "p.json", "item 0"),
    ('{"instruction": "a"}', "p.json", "expected a JSON list"),
    ('[{"instruction": "a"},', "p.json", "not valid JSON"),
    ('{"instruction": "a"}\n{"text": 1}\n', "p.jsonl", "line 2"),
    ("[]", "p.json", "holds no prompts"),
    ("", "p.json", "holds no prompts"),
    ('{"prompt": "a"}\n{"prompt": "b"}\noops\n', "p.jsonl", "line 3 is not valid JSON: Expecting value; fix or delete"),
])
def test_read_prompts_errors_name_the_problem(tmp_path, content, name, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        read_prompts(path)


def test_render_applies_the_chat_template_once(tokenizer):
    ids = render(tokenizer, "What is 2+2?", system_prompt="Be brief.")
    text = tokenizer.decode(ids)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert text.rstrip().endswith("assistant")  # generation starts inside the assistant turn
    assert ids[:2] != [tokenizer.bos_token_id] * 2  # no BOS added in front of the template's own


def testdecode_answer_stops_at_the_first_stop_token_and_flags_truncation(tokenizer):
    hello = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    finished = decode_answer(tokenizer, hello + [eos, 7, 7], [eos], max_new_tokens=len(hello) + 3)
    assert finished == {"text": "hello world", "ids": hello, "tokens": len(hello), "truncated": False}
    cut = decode_answer(tokenizer, hello, [eos], max_new_tokens=len(hello))
    assert cut["truncated"] and cut["tokens"] == len(hello)


def test_length_stats():
    stats = length_stats([{"text": "ab", "tokens": 1, "truncated": False},
                          {"text": "abcd", "tokens": 3, "truncated": True},
                          {"text": "abcdefghi", "tokens": 8, "truncated": False}])
    assert stats["tokens"] == {"mean": 4.0, "median": 3, "max": 8}
    assert stats["characters"] == {"mean": 5.0, "median": 4, "max": 9}
    assert stats["hit_max_new_tokens"] == 1 and stats["responses"] == 3


def _prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": "Hi"},
                                {"instruction": "Write a long and detailed story about a dragon who learns to code."},
                                {"instruction": "List three colours, please, with a short reason for each."}]))
    return path


def test_batched_left_padded_generation_matches_one_at_a_time(tmp_path, model_dir):
    prompts = _prompts(tmp_path)
    common = dict(prompts=prompts, max_new_tokens=12, temperature=0.0)
    batched = generate_command(str(model_dir), out=tmp_path / "batched.json", sets=["train.eval_batch_size=3"], **common)
    single = generate_command(str(model_dir), out=tmp_path / "single.json", generator="mine",
                              sets=["train.eval_batch_size=1"], **common)
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert any(r["output"] for r in batched)
    written = json.loads((tmp_path / "batched.json").read_text())
    assert [set(r) for r in written] == [{"instruction", "output", "generator"}] * 3
    assert [r["instruction"] for r in written] == [p["instruction"] for p in json.loads(prompts.read_text())]
    assert written[0]["generator"] == "model" and single[0]["generator"] == "mine"
    stats = json.loads(stats_path(tmp_path / "batched.json").read_text())
    assert stats["responses"] == 3 and 0 < stats["tokens"]["max"] <= 12


def test_generate_from_a_run_uses_its_adapter(tmp_path, model_dir):
    run = tiny_run_folder(tmp_path / "run", model_dir)
    prompts = _prompts(tmp_path)
    base = generate_command(str(model_dir), prompts=prompts, out=tmp_path / "base.json", max_new_tokens=12,
                            sets=["model.quantize=true"])
    tuned = generate_command(str(run), prompts=prompts, out=tmp_path / "run.json", max_new_tokens=12)
    assert tuned[0]["generator"] == "run"
    assert [r["output"] for r in tuned] != [r["output"] for r in base]


def test_sampling_is_seeded(tmp_path, model_dir):
    prompts = _prompts(tmp_path)
    runs = [generate_command(str(model_dir), prompts=prompts, out=tmp_path / f"s{i}.json", max_new_tokens=8,
                             temperature=1.0) for i in range(2)]
    assert runs[0] == runs[1]


def test_without_prompts_the_eval_split_of_the_data_is_answered(tmp_path, model_dir):
    from tiny_models import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    records = generate_command(str(model_dir), out=tmp_path / "eval.json", data=str(pairs), max_new_tokens=4,
                               sets=["data.eval_fraction=0.5"])
    questions = {json.loads(line)["prompt"] for line in pairs.read_text().splitlines()}
    assert len(records) == 4 and all(r["instruction"] in questions for r in records)
    assert {r["dataset"] for r in records} == {str(pairs)}


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(temperature=-1.0), "--temperature"),
    (dict(top_p=1.5), "--top-p"),
    (dict(out="answers.txt"), "must end in .json"),
])
def test_generate_rejects_bad_options(tmp_path, model_dir, kwargs, fragment):
    args = {"prompts": _prompts(tmp_path), "out": tmp_path / "o.json", **kwargs}
    args["out"] = tmp_path / args["out"]
    with pytest.raises(UserError, match=fragment):
        generate_command(str(model_dir), **args)


def test_unknown_model_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        generate_command(str(tmp_path / "nope"), prompts=_prompts(tmp_path), out=tmp_path / "o.json")


def test_an_existing_out_file_is_kept_unless_overwrite(tmp_path, model_dir):
    """A benchmark's answers can take hours: a second command with the same --out replaced them in silence."""
    out = tmp_path / "answers.json"
    out.write_text("[]")
    with pytest.raises(UserError, match="answers.json' exists: add --overwrite"):
        generate_command(str(model_dir), prompts=_prompts(tmp_path), out=out, max_new_tokens=2)
    assert out.read_text() == "[]"
    records = generate_command(str(model_dir), prompts=_prompts(tmp_path), out=out, max_new_tokens=2, overwrite=True)
    assert json.loads(out.read_text()) == records
