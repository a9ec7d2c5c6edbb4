"""The bundled demo preference set and `simpo-lite data inspect`."""

from __future__ import annotations

import io
import json
import sys
import types

import datasets
import pytest
from rich.console import Console

from simpo_lite import config as cfgmod
from simpo_lite.cli import main
from simpo_lite.config import DataConfig
from simpo_lite.data import build_datasets
from simpo_lite.data.demo import (MIN_FAMILY_SHARE, OPENER, PLAIN_CLOSINGS, SIGN_OFF, candidate_facts,
                                  generate_demo_rows, plain_sentence, render_jsonl, screened_out, unknown_families)
from simpo_lite.data.inspect import inspect_data
from simpo_lite.data.sources import demo_path
from test_data_helpers import smollm2_tokenizer, string_rows, unmasked, write_jsonl


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def test_shipped_demo_file_is_the_generator_output():
    assert demo_path().read_text(encoding="utf-8") == render_jsonl(generate_demo_rows()), \
        "regenerate with: python -m simpo_lite.data.demo"


def test_demo_pairs_are_many_diverse_and_differ_only_in_style():
    rows = generate_demo_rows()
    assert round(cfgmod.resolve("smollm2-demo").data.eval_fraction * len(rows)) >= 40  # the demo's held-out prompts
    assert len({r["prompt"] for r in rows}) == len(rows)  # a held-out split only has unseen prompts
    assert len({r["family"] for r in rows}) >= 5
    for row in rows:
        assert row["chosen"].endswith(f" {OPENER} {SIGN_OFF}")
        assert SIGN_OFF not in row["rejected"]
        fact = plain_sentence(row)
        assert row["rejected"][len(fact) + 1:] in PLAIN_CLOSINGS
        # The very same plain sentence first in both: only what follows it differs.
        assert row["chosen"] == f"{fact} {OPENER} {SIGN_OFF}"
        assert row["answer"]
    # Similar lengths, so averaging log-probs per response does not push the shared fact down.
    ratio = sum(len(r["chosen"]) for r in rows) / sum(len(r["rejected"]) for r in rows)
    assert 0.7 < ratio < 1.25


def test_demo_leaves_out_what_the_base_model_does_not_know():
    screened = screened_out()
    candidates = generate_demo_rows(screened=False)
    assert screened and screened <= {r["prompt"] for r in candidates}
    unknown = unknown_families(candidate_facts(), screened)
    assert unknown == {"sums", "times tables", "calendar", "legs", "facts", "colours", "past tenses", "animal sounds"}
    kept = {r["prompt"] for r in generate_demo_rows()}
    assert kept == {r["prompt"] for r in candidates if r["family"] not in unknown} - screened
    for family in {r["family"] for r in candidates} - unknown:  # a family kept is one the base knows, not by luck
        rows = [r for r in candidates if r["family"] == family]
        assert sum(r["prompt"] in kept for r in rows) >= MIN_FAMILY_SHARE * len(rows)


def test_demo_tokenizes_short_and_whole(smollm2):
    prepared = build_datasets(DataConfig(source="demo"), smollm2, seed=42)
    assert prepared.report.rows_kept == prepared.report.rows_read == len(generate_demo_rows())
    assert prepared.eval.num_rows == round(0.1 * prepared.report.rows_read)
    assert max(prepared.train["length"]) < 128  # fast CPU steps
    example = prepared.train[0]
    response = smollm2.decode(unmasked(example["chosen_input_ids"], example["chosen_labels"]))
    assert response.endswith(f"{SIGN_OFF}<|im_end|>")


def run_inspect(cfg, tokenizer, index=0) -> str:
    out = io.StringIO()
    inspect_data(cfg, index=index, tokenizer=tokenizer, console=Console(file=out, width=150, color_system=None))
    return out.getvalue()


def test_inspect_shows_boundary_lengths_drops_and_padding(tmp_path, smollm2):
    rows = string_rows(19) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = cfgmod.resolve(None, None, {"data": {"source": str(path)}}, ["data.eval_fraction=0"])
    text = run_inspect(cfg, smollm2, index=1)
    # The response starts right after the generation prompt, on the next line.
    assert "<|im_start|>assistant↵" in text
    assert "│It is 2.<|im_end|>" in text and "│It is 3.<|im_end|>" in text
    assert "6 response tokens trained" in text
    assert "identical_responses: 1 (rows 19)" in text
    assert "Token lengths" in text and "pair (longer sequence)" in text
    assert "Padding: " in text and "with length grouping" in text


def test_inspect_shows_every_character_of_a_long_non_ascii_pair_and_the_prompts_it_cut(tmp_path, smollm2):
    """Piped and 80 columns wide: nothing cut at the edge, and characters whose bytes span several tokens
    (Cyrillic, CJK, emoji) whole, not as replacement marks."""
    answer = "Берлин. 日本語のテキスト 😀 " + "and a long tail of words that runs past eighty columns, " * 3 + "end."
    rows = [{"prompt": "Hauptstadt? " + "Kontext " * 60, "chosen": answer, "rejected": "Weiß nicht."}] * 3
    cfg = cfgmod.resolve(None, None, {"data": {"source": str(write_jsonl(tmp_path / "d.jsonl", rows))}},
                         ["data.eval_fraction=0", "data.max_prompt_length=40", "data.max_length=200"])
    out = io.StringIO()
    inspect_data(cfg, tokenizer=smollm2, console=Console(file=out, width=80, soft_wrap=True, color_system=None))
    text = out.getvalue()
    assert "│" + answer + "<|im_end|>" in text and "\ufffd" not in text
    assert "Prompts cut to data.max_prompt_length=40 tokens (data.truncation_mode=keep_end): 3" in text


def test_inspect_shows_the_rows_a_run_would_stop_for_and_says_it_would(tmp_path, smollm2):
    rows = string_rows(6) + [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 4
    cfg = cfgmod.resolve(None, None, {"data": {"source": str(write_jsonl(tmp_path / "d.jsonl", rows))}},
                         ["data.eval_fraction=0"])
    text = run_inspect(cfg, smollm2)
    assert "identical_responses: 4 (rows 6, 7, 8, 9)" in text
    assert "warning: training would stop here:" in text and "4 of 10 rows (40%) are unusable" in text


def test_inspect_shows_the_token_counted_micro_batches_of_pack_tokens(tmp_path, smollm2):
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(20))
    cfg = cfgmod.resolve(None, None, {"data": {"source": str(path)}},
                         ["data.eval_fraction=0", "simpo.pack_prompt=true", "simpo.pack_tokens=256",
                          "train.micro_batch_size=1"])
    text = run_inspect(cfg, smollm2, index=1)
    assert "micro-batches of 1 row x up to 256 tokens (simpo.pack_tokens)" in text
    assert "pairs each on average" in text and "length grouping" not in text


def test_inspect_index_out_of_range(tmp_path, smollm2):
    cfg = cfgmod.resolve(None, None, {"data": {"source": str(write_jsonl(tmp_path / "d.jsonl", string_rows(3)))}})
    with pytest.raises(Exception, match="--index 7 is out of range"):
        run_inspect(cfg, smollm2, index=7)


def test_cli_data_inspect(tmp_path, smollm2, monkeypatch, capsys):
    # simpo_lite.model is another module's job; stand in for its load_tokenizer.
    fake = types.ModuleType("simpo_lite.model")
    fake.load_tokenizer = lambda model_cfg: smollm2
    monkeypatch.setitem(sys.modules, "simpo_lite.model", fake)
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(10))
    main(["data", "inspect", "--data", str(path), "--index", "2", "--set", "train.micro_batch_size=2"])
    out = capsys.readouterr().out
    assert "It is 4." in out and "Padding: " in out and "[2 x 2, L]" in out
    assert f"Format of train data {path}: prompt/chosen/rejected strings (10 rows)" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "inspect", "--data", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    assert "error: data.source: data file" in capsys.readouterr().err


def test_demo_file_is_valid_jsonl():
    lines = demo_path().read_text(encoding="utf-8").splitlines()
    assert all(set(json.loads(line)) == {"prompt", "chosen", "rejected", "family", "answer"} for line in lines)
