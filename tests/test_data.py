"""The preference data pipeline: formats, masking, truncation, sources, validation, batching."""

from __future__ import annotations

import json
import re
import shutil
import time

import datasets
import pytest
import torch

from simpo_lite.config import DataConfig
from simpo_lite.data import PairCollator, batch_indices, build_datasets, padding_fraction
from simpo_lite.data.formats import Columns, RowProblem, normalise, resolve_columns
from simpo_lite.data.tokenize import PairTokenizer
from simpo_lite.errors import UserError
from test_data_helpers import (llama3_tokenizer, no_system_tokenizer, plain_tokenizer, smollm2_tokenizer,
                               string_rows, unmasked, write_jsonl)

COLS = Columns(prompt="prompt", chosen="chosen", rejected="rejected", system="system")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep every Arrow cache of these tests out of the user's datasets cache."""
    cache = tmp_path_factory.getbasetemp() / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def build(rows_or_path, tmp_path, tokenizer, **cfg):
    path = rows_or_path if not isinstance(rows_or_path, list) else write_jsonl(tmp_path / "data.jsonl", rows_or_path)
    cfg.setdefault("eval_fraction", 0.0)
    return build_datasets(DataConfig(source=str(path), **cfg), tokenizer, seed=0)


# ---- formats ---------------------------------------------------------------------------------------

def test_plain_string_rows():
    pair = normalise({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}, COLS)
    assert pair.messages == [user("Hi?")] and (pair.chosen, pair.rejected) == ("Hello!", "Go.")


def test_conversational_rows_with_message_list_prompt():
    prompt = [{"role": "system", "content": "Be nice."}, user("Hi?"), assistant("Hey."), user("And?")]
    pair = normalise({"prompt": prompt, "chosen": [assistant("Yes!")], "rejected": [assistant("No.")]}, COLS)
    assert pair.messages == prompt and (pair.chosen, pair.rejected) == ("Yes!", "No.")


def test_ultrafeedback_rows_take_the_shared_prefix_as_prompt():
    row = {"prompt": "ignored when the responses carry the conversation",
           "chosen": [user("Capital of France?"), assistant("Paris.")],
           "rejected": [user("Capital of France?"), assistant("Lyon.")]}
    pair = normalise(row, COLS)
    assert pair.messages == [user("Capital of France?")] and (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")
    no_prompt_column = Columns(chosen="chosen", rejected="rejected")
    assert normalise({k: row[k] for k in ("chosen", "rejected")}, no_prompt_column).messages == pair.messages


def test_sharegpt_and_other_role_spellings_become_the_templates_roles():
    row = {"chosen": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}],
           "rejected": [{"role": "User", "content": "Capital of France?"}, {"role": "bot", "content": "Lyon."}]}
    pair = normalise(row, Columns(chosen="chosen", rejected="rejected"))
    assert pair.messages == [user("Capital of France?")] and (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")


def test_a_role_the_template_does_not_know_skips_the_row():
    row = {"prompt": [{"role": "narrator", "content": "Once..."}], "chosen": [assistant("A")],
           "rejected": [assistant("B")]}
    with pytest.raises(RowProblem) as problem:
        normalise(row, COLS)
    assert problem.value.rule == "unknown_role"


HH_CHOSEN = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.\n\n"
             "Human: Something shorter?\n\nAssistant: Tom.")
HH_REJECTED = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.\n\n"
               "Human: Something shorter?\n\nAssistant: I don't know.")
HH_COLS = Columns(chosen="chosen", rejected="rejected")


def test_anthropic_hh_rows_keep_the_history_as_messages():
    pair = normalise({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, HH_COLS)
    assert pair.messages == [user("What is a good name for a cat?"), assistant("Whiskers is a classic."),
                             user("Something shorter?")]
    assert (pair.chosen, pair.rejected) == ("Tom.", "I don't know.")
    assert pair.kind == "Anthropic HH-style (Human:/Assistant: transcripts)"
    # A prompt column in the same form is read as turns too, its empty closing Assistant turn dropped.
    split = normalise({"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello!", "rejected": " Go."}, COLS)
    assert split.messages == [user("Hi?")] and split.chosen == " Hello!"


@pytest.mark.parametrize("chosen, rejected, rule", [
    (HH_CHOSEN, HH_REJECTED.replace("Something shorter?", "Something longer?"), "different_prompts"),
    (HH_CHOSEN, "\n\nHuman: A different question?\n\nAssistant: Tom.", "different_prompts"),
    ("\n\nHuman: Only a question?\n\nAssistant: Hm.\n\nHuman: Well?", HH_REJECTED, "bad_conversation"),
])
def test_hh_rows_that_would_mix_prompts_are_skipped_by_rule(chosen, rejected, rule):
    with pytest.raises(RowProblem) as err:
        normalise({"chosen": chosen, "rejected": rejected}, HH_COLS)
    assert err.value.rule == rule


def test_hh_rows_through_the_pipeline_report_format_and_skips(tmp_path, smollm2):
    rows = [{"chosen": HH_CHOSEN.replace("cat", f"cat {i}"), "rejected": HH_REJECTED.replace("cat", f"cat {i}")}
            for i in range(4)]
    rows.append({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("cat", "dog")})
    prepared = build(rows, tmp_path, smollm2, max_bad_fraction=0.5)
    assert prepared.train.num_rows == 4
    source = prepared.report.sources[0]
    assert source.kinds == {"Anthropic HH-style (Human:/Assistant: transcripts)": 4}
    assert source.dropped == {"different_prompts": 1} and source.first_rows["different_prompts"] == [4]
    first = prepared.train[0]
    text = smollm2.decode(first["chosen_input_ids"])
    assert "Whiskers is a classic." in text and text.count("<|im_start|>user") == 2
    assert smollm2.decode(unmasked(first["chosen_input_ids"], first["chosen_labels"])) == "Tom.<|im_end|>"


def test_system_message_from_column_then_config_never_replacing_one_in_the_prompt():
    row = {"prompt": "Hi?", "chosen": "a", "rejected": "b", "system": "From the row."}
    assert normalise(row, COLS, "Default.").messages[0] == {"role": "system", "content": "From the row."}
    assert normalise(dict(row, system=None), COLS, "Default.").messages[0]["content"] == "Default."
    assert normalise(dict(row, system=None), COLS).messages == [user("Hi?")]
    own = dict(row, prompt=[{"role": "system", "content": "Own."}, user("Hi?")])
    assert [m["content"] for m in normalise(own, COLS, "Default.").messages] == ["Own.", "Hi?"]


@pytest.mark.parametrize("row, rule", [
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "missing_field"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "not_text"),
    ({"prompt": 3.5, "chosen": "a", "rejected": "b"}, "not_text"),
    ({"prompt": "p", "chosen": [assistant(None)], "rejected": "b"}, "not_text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "system": 7}, "not_text"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "bad_conversation"),
    ({"prompt": "p", "chosen": [user("u")], "rejected": "b"}, "bad_conversation"),
    ({"chosen": [user("u"), assistant("a")], "rejected": [user("v"), assistant("b")]}, "different_prompts"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": "p", "chosen": " \n", "rejected": "b"}, "empty_response"),
    ({"prompt": "p", "chosen": [assistant("")], "rejected": [assistant("b")]}, "empty_response"),
    ({"prompt": "p", "chosen": "same ", "rejected": "same"}, "identical_responses"),
])
def test_each_bad_row_rule(row, rule):
    with pytest.raises(RowProblem) as err:
        normalise(row, COLS)
    assert err.value.rule == rule


def test_column_detection_and_mapping():
    assert resolve_columns(["instruction", "chosen", "rejected"], {}, "x").prompt == "instruction"
    cols = resolve_columns(["q", "good", "bad", "sys"], {"prompt": "q", "chosen": "good", "rejected": "bad",
                                                          "system": "sys"}, "x")
    assert (cols.prompt, cols.chosen, cols.rejected, cols.system) == ("q", "good", "bad", "sys")
    with pytest.raises(UserError, match="no 'rejected' column in x"):
        resolve_columns(["prompt", "chosen"], {}, "x")
    with pytest.raises(UserError, match="data.columns.chosen: no column 'nope'"):
        resolve_columns(["prompt", "chosen", "rejected"], {"chosen": "nope"}, "x")
    with pytest.raises(UserError, match="unknown field 'answer'"):
        resolve_columns(["prompt", "chosen", "rejected"], {"answer": "chosen"}, "x")
    # Every problem at once: not a fix-and-rerun per column.
    with pytest.raises(UserError, match="no 'chosen' or 'rejected' column in x .its columns: q, a, b."):
        resolve_columns(["q", "a", "b"], {}, "x")
    with pytest.raises(UserError, match="chosen: no column 'gud' in x; data.columns.rejected: no column 'bda'"):
        resolve_columns(["q", "a", "b"], {"chosen": "gud", "rejected": "bda"}, "x")


def test_column_mapping_through_the_pipeline(tmp_path, smollm2):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in string_rows(4)]
    prepared = build(rows, tmp_path, smollm2, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert prepared.train.num_rows == 4
    first = prepared.train[0]
    assert smollm2.decode(unmasked(first["chosen_input_ids"], first["chosen_labels"])) == "It is 0.<|im_end|>"


# ---- templating and masking ------------------------------------------------------------------------

MIXED_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [user("Hi")], "chosen": [assistant("Hello there")], "rejected": [assistant("Go away")]},
    {"chosen": [user("Q?"), assistant("A!")], "rejected": [user("Q?"), assistant("B.")]},
]
RESPONSES = [("4", "5"), ("Hello there", "Go away"), ("A!", "B.")]


def check_pair(tok, example, chosen, rejected, end_token):
    """Unmasked tokens are exactly the response plus one end-of-turn token; BOS occurs once at most."""
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        assert len(ids) == len(labels)
        response = unmasked(ids, labels)
        assert tok.decode(response) == text + end_token
        assert response.count(tok.convert_tokens_to_ids(end_token)) == 1
        n_prompt = example["prompt_length"]
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert ids[n_prompt:] == response  # the masked part is one prefix, the response one suffix
        if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
            assert ids[1] != tok.bos_token_id


def test_chatml_masking_bos_and_eos(tmp_path, smollm2):
    prepared = build(MIXED_ROWS, tmp_path, smollm2)
    for example, (chosen, rejected) in zip(prepared.train, RESPONSES):
        check_pair(smollm2, example, chosen, rejected, "<|im_end|>")
    first = prepared.train[0]
    prompt = smollm2.apply_chat_template([user("What is 2+2?")], tokenize=False, add_generation_prompt=True)
    assert smollm2.decode(first["chosen_input_ids"][:first["prompt_length"]]) == prompt
    # ChatML's BOS is <|im_start|>: one per turn (system, user, assistant), none doubled.
    assert first["chosen_input_ids"].count(smollm2.bos_token_id) == 3


@pytest.mark.parametrize("adds_bos", [True, False])
def test_llama3_template_has_one_bos_and_one_eot(tmp_path, adds_bos):
    tok = llama3_tokenizer(adds_bos=adds_bos)
    prepared = build(MIXED_ROWS, tmp_path, tok)
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    for example, (chosen, rejected) in zip(prepared.train, RESPONSES):
        check_pair(tok, example, chosen, rejected, "<|eot_id|>")
        for ids in (example["chosen_input_ids"], example["rejected_input_ids"]):
            assert ids[0] == bos and ids.count(bos) == 1
            assert ids.count(eot) == 2  # the user turn's and the response's
    text = tok.decode(prepared.train[0]["chosen_input_ids"])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    assert tok.pad_token == "<|eot_id|>"  # no pad token: EOS stands in


def test_no_chat_template_fallback_adds_bos_and_eos_once(tmp_path):
    tok = plain_tokenizer()
    tok.add_bos_token = True
    prepared = build(MIXED_ROWS, tmp_path, tok, system_prompt="Be brief.")
    first = prepared.train[0]
    assert tok.decode(first["chosen_input_ids"]) == "<|im_start|>Be brief.\n\nWhat is 2+2?\n4<|im_end|>"
    assert first["chosen_input_ids"].count(tok.bos_token_id) == 1
    for example, (chosen, rejected) in zip(prepared.train, RESPONSES):
        check_pair(tok, example, chosen, rejected, tok.eos_token)
    assert tok.pad_token == tok.eos_token


def test_template_without_system_role_gets_system_text_in_the_first_user_turn(tmp_path):
    tok = no_system_tokenizer()
    rows = MIXED_ROWS + [{"prompt": [{"role": "tool", "content": "x"}, user("Hi")], "chosen": "a", "rejected": "b"}]
    prepared = build(rows, tmp_path, tok, system_prompt="Be brief.", max_bad_fraction=0.5)
    text = tok.decode(prepared.train[0]["chosen_input_ids"])
    assert text == ("<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
                    "<start_of_turn>assistant\n4<end_of_turn>")
    for example, (chosen, rejected) in zip(prepared.train, RESPONSES):
        check_pair(tok, example, chosen, rejected, "<end_of_turn>")
    assert prepared.report.dropped == {"template_error": 1}


# ---- truncation ------------------------------------------------------------------------------------

def test_truncation_follows_the_reference_trainer(smollm2):
    pairs = PairTokenizer(smollm2, max_length=10, max_prompt_length=4, truncation_mode="keep_end")
    prompt = [1, 11, 12, 13, 14, 15, 16]  # starts with BOS (<|im_start|>)
    assert pairs.fit(prompt, [21, 22], [31]) == prompt  # fits: untouched, even if longer than max_prompt_length
    assert pairs.fit(prompt, [21, 22, 23, 24], [31]) == [1, 14, 15, 16]  # keep_end keeps BOS first
    # Where the BOS token also opens each turn (ChatML's <|im_start|>), a lone kept one would head a turn
    # without its role: the last tokens alone, as the reference trainer keeps them.
    turns = [1, 11, 12, 1, 13, 14, 15, 1, 16]
    assert pairs.fit(turns, [21, 22, 23, 24], [31]) == [14, 15, 1, 16]
    assert pairs.fit(prompt, list(range(7)), [31]) is None  # 4 + 7 > 10 even after cutting: dropped
    start = PairTokenizer(smollm2, max_length=10, max_prompt_length=4, truncation_mode="keep_start")
    assert start.fit(prompt, [21, 22, 23, 24], [31]) == [1, 11, 12, 13]


def test_too_long_pairs_are_dropped_and_reported(tmp_path, smollm2):
    rows = string_rows(9) + [{"prompt": "Short?", "chosen": "word " * 200, "rejected": "No."}]
    prepared = build(rows, tmp_path, smollm2, max_length=80, max_prompt_length=40)
    assert prepared.train.num_rows == 9
    assert prepared.report.sources[0].dropped == {"too_long": 1}
    assert prepared.report.sources[0].first_rows == {"too_long": [9]}
    assert max(prepared.train["length"]) <= 80


def test_long_prompt_is_cut_to_max_prompt_length(tmp_path, smollm2):
    rows = [{"prompt": "blah " * 100 + "What now?", "chosen": "Stop.", "rejected": "Go."}]
    prepared = build(rows, tmp_path, smollm2, max_length=60, max_prompt_length=40, truncation_mode="keep_end")
    example = prepared.train[0]
    # SmolLM2's BOS, <|im_start|>, opens every turn: the cut keeps the last 40 tokens, no lone turn opener.
    assert example["prompt_length"] == 40 and example["chosen_input_ids"][0] != smollm2.bos_token_id
    assert smollm2.decode(example["chosen_input_ids"][:40]).endswith("What now?<|im_end|>\n<|im_start|>assistant\n")
    check_pair(smollm2, example, "Stop.", "Go.", "<|im_end|>")


# ---- sources ---------------------------------------------------------------------------------------

def write_all_formats(tmp_path, rows):
    data = datasets.Dataset.from_list(rows)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows), "json": tmp_path / "d.json",
             "parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv"}
    paths["json"].write_text(json.dumps(rows))
    data.to_parquet(str(paths["parquet"]))
    data.to_csv(str(paths["csv"]), index=False)
    return paths


def test_every_file_format_gives_the_same_tokens(tmp_path, smollm2):
    paths = write_all_formats(tmp_path, string_rows(6))
    results = {kind: build(path, tmp_path, smollm2).train.to_dict() for kind, path in paths.items()}
    assert all(r == results["jsonl"] for r in results.values())
    assert len(results["jsonl"]["chosen_input_ids"]) == 6


def test_conversational_parquet(tmp_path, smollm2):
    path = tmp_path / "conv.parquet"
    datasets.Dataset.from_list(MIXED_ROWS[2:] * 3).to_parquet(str(path))
    prepared = build(path, tmp_path, smollm2)
    check_pair(smollm2, prepared.train[0], "A!", "B.", "<|im_end|>")


def test_mixed_type_jsonl_keeps_strings_and_reports_non_text(tmp_path, smollm2):
    # "4" must stay the text "4" although a column mixes strings, lists and numbers.
    rows = MIXED_ROWS + [{"prompt": "x", "chosen": 5, "rejected": "y"}, [1, 2]] + string_rows(6)
    prepared = build(rows, tmp_path, smollm2, max_bad_fraction=0.2)
    check_pair(smollm2, prepared.train[0], "4", "5", "<|im_end|>")
    assert prepared.report.sources[0].dropped == {"not_text": 1, "missing_field": 1}
    assert prepared.report.sources[0].first_rows == {"not_text": [3], "missing_field": [4]}


def test_csv_empty_cell_is_an_empty_response(tmp_path, smollm2):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nHi?,Hello.,Go.\nHey?,,Bye.\nYo?,Sup.,Meh.\n")
    prepared = build(path, tmp_path, smollm2, max_bad_fraction=0.5)
    assert prepared.train.num_rows == 2 and prepared.report.sources[0].first_rows == {"empty_response": [1]}


def test_a_missing_eval_file_names_its_setting(tmp_path, smollm2):
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(4))
    with pytest.raises(UserError, match="data.eval_source: data file '.*nope.jsonl' not found"):
        build(path, tmp_path, smollm2, eval_source=str(tmp_path / "nope.jsonl"))


def test_csv_cells_are_text_as_written(tmp_path, smollm2):
    """pandas would read 4 as a number and NA, None or null as missing: each is an answer here."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nCode of Namibia?,NA,NM\nIs 1 prime?,None,Yes\n"
                    "Empty JSON?,null,{}\n")
    prepared = build(path, tmp_path, smollm2, eval_fraction=0.0)
    assert prepared.train.num_rows == 4 and not prepared.report.sources[0].first_rows


@pytest.mark.parametrize("content, fragment", [
    ("", "d.csv' is empty: a CSV file needs a header row"),
    ('prompt,chosen,rejected\n"a,b\n', "d.csv' as csv: Error tokenizing data. C error: EOF inside string"),
])
def test_unreadable_csv_says_what_is_wrong(tmp_path, smollm2, content, fragment):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(fragment)):
        build(path, tmp_path, smollm2)


@pytest.mark.parametrize("content", ['{"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}',
                                     '{"data": [{"prompt": "a", "chosen": "c", "rejected": "e"}]}'])
def test_a_json_object_of_columns_or_of_rows_under_a_key_is_refused(tmp_path, smollm2, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(UserError, match="holds one JSON object .*not rows: write a JSON list of rows"):
        build(path, tmp_path, smollm2)


def test_a_json_file_of_one_pair_loads(tmp_path, smollm2):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", '
                    '"content": "Hello."}], "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", '
                    '"content": "Go."}]}')
    assert build(path, tmp_path, smollm2, eval_fraction=0.0).train.num_rows == 1


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ('{"prompt": \n{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', r"2 lines are not valid JSON "
                                                                                   r"\(lines 1, 3; line 1: "),
    ("", "has no rows"),
])
def test_unreadable_files_stop_with_one_line(tmp_path, smollm2, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment) as err:
        build(path, tmp_path, smollm2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source, fragment", [
    ("/no/such/file.jsonl", "not found"),
    ("data.txt", "unsupported file type"),
    ("acme/not-cached", "not in the local datasets cache"),
])
def test_missing_sources_are_user_errors(tmp_path, smollm2, monkeypatch, source, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("hello")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=fragment):
        build_datasets(DataConfig(source=source), smollm2, seed=0)


def cache_hub_dataset(cache_dir, repo_id, config, splits, tmp_path):
    """Lay out `repo_id` in the datasets cache exactly as an online load_dataset leaves it."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{config}-{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    namespace, name = repo_id.split("/")
    build_root = tmp_path / "build"
    builder = Parquet(cache_dir=str(build_root), dataset_name=name, config_name=config, config_id=config,
                      hash="0" * 40, data_files=files)
    builder.download_and_prepare()
    target = cache_dir / f"{namespace}___{name}" / config
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(build_root / name / config), str(target))


def test_hub_dataset_with_config_and_splits_from_the_offline_cache(tmp_path, smollm2, datasets_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    train, test = string_rows(8), string_rows(12)[8:]
    cache_hub_dataset(datasets_cache, "acme/prefs", "small", {"train": train, "test": test}, tmp_path)
    cfg = DataConfig(source="acme/prefs", config_name="small", eval_split="test")
    prepared = build_datasets(cfg, smollm2, seed=0)
    assert (prepared.train.num_rows, prepared.eval.num_rows) == (8, 4)
    assert prepared.report.eval_origin == "from acme/prefs (small) [test]"
    with pytest.raises(UserError, match="Unknown split"):
        build_datasets(DataConfig(source="acme/prefs", config_name="small", split="validation"), smollm2, 0)


def test_an_unreachable_hub_loads_a_cached_dataset_at_once_and_refuses_a_missing_one_at_once(
        tmp_path, smollm2, datasets_cache, monkeypatch):
    from huggingface_hub import constants
    from tiny_models import free_port

    def online_but_unreachable():  # a Hub address nothing listens on
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", constants.ENDPOINT)

    cache_hub_dataset(datasets_cache, "acme/cached", "small", {"train": string_rows(8)}, tmp_path)
    online_but_unreachable()
    start = time.perf_counter()
    prepared = build_datasets(DataConfig(source="acme/cached", config_name="small", eval_fraction=0), smollm2, 0)
    assert prepared.train.num_rows == 8 and time.perf_counter() - start < 15  # no rounds of retries
    online_but_unreachable()
    start = time.perf_counter()
    with pytest.raises(UserError, match="'acme/not-cached': it is not in the local datasets cache and the Hub cannot"):
        build_datasets(DataConfig(source="acme/not-cached"), smollm2, seed=0)
    assert time.perf_counter() - start < 15


def test_save_to_disk_folder_with_splits(tmp_path, smollm2):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(string_rows(5)),
                          "test_prefs": datasets.Dataset.from_list(string_rows(3))}).save_to_disk(str(folder))
    cfg = DataConfig(source=str(folder), split="train_prefs", eval_split="test_prefs")
    prepared = build_datasets(cfg, smollm2, seed=0)
    assert (prepared.train.num_rows, prepared.eval.num_rows) == (5, 3)
    with pytest.raises(UserError, match="no split 'test'; its splits are train_prefs, test_prefs"):
        build_datasets(DataConfig(source=str(folder), split="test"), smollm2, 0)


# ---- evaluation data -------------------------------------------------------------------------------

def test_held_out_fraction_is_fixed_by_the_seed(tmp_path, smollm2):
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(40))
    cfg = DataConfig(source=str(path), eval_fraction=0.25)
    first, again, other = (build_datasets(cfg, smollm2, seed=s) for s in (1, 1, 2))
    assert first.eval.num_rows == 10 and first.train.num_rows == 30
    assert list(first.eval["row"]) == list(again.eval["row"]) != list(other.eval["row"])
    assert sorted(list(first.eval["row"]) + list(first.train["row"])) == list(range(40))
    assert build_datasets(DataConfig(source=str(path), eval_fraction=0.0), smollm2, 1).eval is None


def test_a_prompt_is_held_out_with_all_its_pairs(tmp_path, smollm2):
    """30 prompts with 3 pairs each: row by row, nearly every held-out prompt would also be trained on."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}{'!' * j}",
             "rejected": f"It is {2 * i + 1 + j}."} for i in range(30) for j in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = build_datasets(DataConfig(source=str(path), eval_fraction=0.2), smollm2, seed=1)
    held, trained = set(prepared.eval["question"]), set(prepared.train["question"])
    assert len(held) == 6 and not held & trained and prepared.eval.num_rows == 18


def test_with_every_prompt_different_the_hold_out_is_by_row_as_before():
    """The split of data whose prompts are all different (the demo's) is what it was before grouping."""
    import numpy as np

    from simpo_lite.data.pipeline import _hold_out

    dataset = datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(40)], "row": list(range(40))})
    train, held = _hold_out(dataset, 0.25, seed=3)
    assert sorted(held["row"]) == sorted(np.random.default_rng(3).permutation(40)[:10].tolist())
    assert sorted(list(train["row"]) + list(held["row"])) == list(range(40))


def test_separate_eval_file_and_pair_limits(tmp_path, smollm2):
    train = write_jsonl(tmp_path / "train.jsonl", string_rows(20))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", MIXED_ROWS)
    cfg = DataConfig(source=str(train), eval_source=str(evaluation), max_train_pairs=7, eval_max_pairs=2)
    prepared = build_datasets(cfg, smollm2, seed=0)
    assert (prepared.train.num_rows, prepared.eval.num_rows) == (7, 2)
    assert [s.role for s in prepared.report.sources] == ["train", "eval"]
    with pytest.raises(UserError, match="single file without a 'test' split"):
        build_datasets(DataConfig(source=str(train), eval_split="test"), smollm2, 0)


# ---- validation threshold and report ---------------------------------------------------------------

def rows_with_bad(n_good: int, n_bad: int) -> list[dict]:
    bad = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * n_bad
    return bad + string_rows(n_good)


def test_too_many_bad_rows_stop_before_training(tmp_path, smollm2):
    with pytest.raises(UserError) as err:
        build(rows_with_bad(7, 3), tmp_path, smollm2, max_bad_fraction=0.2)
    message = str(err.value)
    assert "\n" not in message
    assert "3 of 10 rows (30%)" in message
    assert "identical_responses 3 (first rows 0, 1, 2: chosen and rejected are the same text)" in message
    assert "data.max_bad_fraction=0.2" in message
    prepared = build(rows_with_bad(7, 3), tmp_path, smollm2, max_bad_fraction=0.3)
    assert prepared.report.rows_read == 10 and prepared.report.rows_kept == 7
    assert sum(prepared.report.sources[0].kinds.values()) == 7  # formats of the rows kept, as inspect shows them
    with pytest.raises(UserError, match="none of its 3 rows is usable"):
        build(rows_with_bad(0, 3), tmp_path, smollm2, max_bad_fraction=1.0)


def test_report_summary_names_rules_rows_and_lengths(tmp_path, smollm2):
    rows = rows_with_bad(20, 0) + [{"prompt": "p", "chosen": None, "rejected": "r"}] * 7
    prepared = build(rows, tmp_path, smollm2, max_bad_fraction=0.5, eval_fraction=0.1)
    summary = prepared.report.summary()
    assert "27 rows read, 20 kept" in summary
    assert "missing_field: 7 (rows 20, 21, 22, 23, 24, ...)" in summary
    assert "pairs: 18 train, 2 eval" in summary and "train prompt tokens: min" in summary
    stats = prepared.report.lengths["train"]["pair (longer sequence)"]
    assert stats["max"] == max(prepared.train["length"])


# ---- caching and parallelism -----------------------------------------------------------------------

def test_tokenization_is_cached_and_parallel_gives_the_same_result(tmp_path, smollm2, datasets_cache):
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(30))
    cfg = DataConfig(source=str(path), eval_fraction=0.0)
    first = build_datasets(cfg, smollm2, seed=0)
    files = {p: p.stat().st_mtime_ns for p in datasets_cache.rglob("cache-*.arrow")}
    assert files  # the map result is written beside the file's Arrow cache
    second = build_datasets(cfg, smollm_copy := smollm2_tokenizer(), seed=0)
    assert {p: p.stat().st_mtime_ns for p in datasets_cache.rglob("cache-*.arrow")} == files
    assert second.train.to_dict() == first.train.to_dict() and smollm_copy is not smollm2
    parallel = build_datasets(DataConfig(source=str(path), eval_fraction=0.0, num_proc=2,
                                         max_length=500), smollm2, seed=0)
    assert parallel.train.to_dict() == first.train.to_dict()


# ---- batching --------------------------------------------------------------------------------------

def test_collator_stacks_chosen_then_rejected_right_padded():
    features = [{"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7],
                 "rejected_input_ids": [5, 8], "rejected_labels": [-100, 8]},
                {"chosen_input_ids": [9, 1, 2, 3, 4], "chosen_labels": [-100, -100, 2, 3, 4],
                 "rejected_input_ids": [9, 1], "rejected_labels": [-100, 1]}]
    batch = PairCollator(pad_token_id=0)(features)
    assert all(t.dtype == torch.long and t.shape == (4, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [9, 1, 2, 3, 4], [5, 8, 0, 0, 0], [9, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 2, 3, 4],
                                        [-100, 8, -100, -100, -100], [-100, 1, -100, -100, -100]]


def test_collator_on_prepared_data(tmp_path, smollm2):
    prepared = build(MIXED_ROWS, tmp_path, smollm2)
    batch = PairCollator(smollm2.pad_token_id)([prepared.train[i] for i in range(3)])
    for row, example in enumerate(prepared.train):
        n = len(example["rejected_input_ids"])
        assert batch["input_ids"][3 + row, :n].tolist() == example["rejected_input_ids"]
        assert batch["labels"][3 + row, :n].tolist() == example["rejected_labels"]
        assert batch["attention_mask"][3 + row].sum() == n


def test_batch_indices_are_deterministic_complete_and_grouped():
    lengths = [(i * 37) % 101 + 1 for i in range(250)]
    batches = batch_indices(lengths, 4, seed=3, epoch=1)
    assert batches == batch_indices(lengths, 4, seed=3, epoch=1)
    assert batches != batch_indices(lengths, 4, seed=3, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # out-of-memory shows at step 1
    grouped = padding_fraction(batches, lengths)
    random = padding_fraction(batch_indices(lengths, 4, seed=3, epoch=1, group_by_length=False), lengths)
    assert grouped < random / 3
    ordered = batch_indices(lengths, 4, shuffle=False)
    assert [lengths[b[0]] for b in ordered] == sorted((lengths[b[0]] for b in ordered), reverse=True)
    dropped = batch_indices(lengths, 4, seed=0, drop_last=True)
    assert len(dropped) == 62 and all(len(b) == 4 for b in dropped)
    assert batch_indices(list(range(5)), 2, shuffle=False, group_by_length=False) == [[0, 1], [2, 3], [4]]


def test_padding_fraction_counts_the_stacked_tensor():
    # One batch of pairs (3, 1) and (2, 2): a [4, 3] tensor holding 8 tokens -> 4 of 12 slots padded.
    assert padding_fraction([[0, 1]], [3, 2], [1, 2]) == pytest.approx(4 / 12)
    assert padding_fraction([[0], [1]], [3, 2], [3, 2]) == 0.0
    assert padding_fraction([], [], []) == 0.0


def test_a_prompt_with_most_of_the_rows_is_not_held_out_for_a_tenth():
    from simpo_lite.data.pipeline import _hold_out

    questions = ["Continue."] * 45 + [f"q{i}" for i in range(5)]
    dataset = datasets.Dataset.from_dict({"question": questions, "row": list(range(50))})
    for seed in range(20):
        train, held = _hold_out(dataset, 0.1, seed)
        assert held.num_rows == 5 and "Continue." not in held["question"], seed
    one = datasets.Dataset.from_dict({"question": ["Same."] * 10, "row": list(range(10))})
    assert _hold_out(one, 0.1, 0)[1] is None
