"""`simpo-lite export --format gguf`: tiny models of every supported architecture through transformers' GGUF
reader (and llama.cpp where llama-cpp-python is installed), the export of a run, its Modelfile, card and
push, and the refusals.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simpo_lite.errors import UserError
from simpo_lite.export import export_run
from simpo_lite.gguf_export import llama_cpp_available, write_gguf
from test_export import SECRET, hub_standin  # noqa: F401  (the Hub stand-in fixture)
from tiny_models import (save_model_folder, smollm2_tokenizer, smollm2_tokenizer_dir, spm_tokenizer,
                         tiny_arch_model, tiny_model_folder, tiny_run_folder)

FAMILIES = ("llama", "mistral", "qwen2", "gemma2")
TEXTS = ("What is the capital of France?", "Two  spaces, digits 2024 and café.", "Explain why the sky is blue.")
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")


def family_tokenizer(family: str):
    return smollm2_tokenizer() if family in ("llama", "qwen2") else spm_tokenizer(family)


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory) -> tuple[str, Path, object]:
    tokenizer = family_tokenizer(request.param)
    model = tiny_arch_model(request.param, tokenizer).eval()
    return request.param, save_model_folder(tmp_path_factory.mktemp(request.param), model, tokenizer), model


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                 "tokenizer.ggml.scores"))}


# q8_0 keeps 8 bits per weight: on a random model, whose top logits nearly tie, it still changes some choices.
@pytest.mark.parametrize("quant, min_top1, max_diff", [("f16", 1.0, 0.1), ("q8_0", 0.8, 1.0)])
def test_tiny_model_of_each_architecture_round_trips_through_transformers(family_folder, quant, min_top1, max_diff):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo_lite.gguf_verify import compare

    family, folder, model = family_folder
    path = folder / f"tiny-{quant}.gguf"
    write_gguf(folder, path, quant, f"tiny {family}", say=lambda _: None)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
    ids = [chat_ids(tokenizer, t) for t in TEXTS]
    with torch.no_grad():
        found = compare([read(input_ids=i).logits for i in ids], [model(input_ids=i).logits for i in ids])
    assert found["top1"] >= min_top1 and found["max_logit_diff"] < max_diff, found

    # The tokenizer a reader rebuilds from the file splits text as the run's tokenizer did.
    rebuilt = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    for text in TEXTS:
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], text

    meta = metadata(path)
    arch = {"mistral": "llama"}.get(family, family)
    config = model.config
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.context_length"] == config.max_position_embeddings
    assert meta[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.model"] == ("gpt2" if family in ("llama", "qwen2") else "llama")
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if family == "gemma2":
        assert meta["gemma2.attn_logit_softcapping"] == pytest.approx(config.attn_logit_softcapping)
        assert meta["gemma2.final_logit_softcapping"] == pytest.approx(config.final_logit_softcapping)
        assert meta["gemma2.attention.key_length"] == 256


@needs_llama_cpp
def test_llama_cpp_runs_a_tiny_model_of_each_architecture(family_folder):
    from simpo_lite.gguf_verify import llama_cpp_check
    from simpo_lite.merge import greedy_answers

    family, folder, model = family_folder
    path = folder / "tiny-cpp-f16.gguf"
    write_gguf(folder, path, "f16", f"tiny {family}", say=lambda _: None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [chat_ids(tokenizer, t) for t in TEXTS]
    with torch.no_grad():
        reference = [model(input_ids=i).logits for i in ids]
    found = llama_cpp_check(path, tokenizer, TEXTS, ids, reference, greedy_answers(model, tokenizer, ids),
                            [tokenizer.eos_token_id])
    assert found["same_tokens"], family
    # transformers' Metaspace tokenizers put no space after a special token; llama.cpp's SentencePiece does.
    assert found["same_chat_tokens"] == (family != "mistral")
    assert found["top1"] >= 0.99 and found["max_logit_diff"] < 0.1, found


def test_an_architecture_without_a_gguf_form_is_refused_by_name(tmp_path):
    from transformers import GPT2Config

    from simpo_lite.gguf_export import check_architecture

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="supports the architectures llama, mistral, qwen2, gemma2, not 'gpt2'"):
        check_architecture(str(tmp_path))


# ---- the export of a run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    base = tiny_model_folder(tmp_path_factory.mktemp("gguf-base"))
    return tiny_run_folder(tmp_path_factory.mktemp("gguf-run") / "run", base, sets=["export.merge_into=original"])


@pytest.fixture(scope="module")
def gguf_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-out") / "gguf"
    return out, export_run(tiny_run, out=out, format="gguf", quant="f16")


def test_export_writes_one_checked_gguf_with_a_modelfile_and_a_card(gguf_export):
    import yaml

    out, result = gguf_export
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "run-f16.gguf"]
    report = result.gguf
    assert report["transformers"]["top1"] >= 0.99 and report["transformers"]["positions"] > 50
    assert (report["llama_cpp"] is not None) == llama_cpp_available()
    # The merge behind it is the safetensors export's, checked the same way.
    assert result.merge_diff is not None and result.merge_diff < 1e-3

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./run-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile  # SmolLM2's ChatML as Ollama's template
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "gguf" in meta["tags"] and meta["library_name"] == "gguf"
    assert "## GGUF check" in card and "ollama create" in card


def test_push_uploads_the_gguf_the_modelfile_and_the_card(tiny_run, tmp_path, hub_standin):  # noqa: F811
    out = tmp_path / "gguf"
    export_run(tiny_run, out=out, format="gguf", quant="f16", push_to_hub="tester/tiny-gguf")
    files = hub_standin.repos["tester/tiny-gguf"]["files"]
    assert files == {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == {"run-f16.gguf", "Modelfile", "README.md"}
    assert "gguf" in hub_standin.cards[0]["tags"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simpo_lite", "export", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, fragment", [
    (["--format", "gguf", "--quant", "q3_x"], "--quant 'q3_x' is not supported: use one of f16, bf16, q8_0, q4_k_m"),
    (["--quant", "q8_0"], "--quant q8_0 applies to GGUF files only: add --format gguf"),
    (["--format", "ggml"], "--format 'ggml' is not supported"),
    (["--format", "gguf", "--adapter-only"], "--format gguf holds the merged model"),
])
def test_bad_requests_are_one_line_and_write_nothing(tiny_run, tmp_path, args, fragment):
    out = tmp_path / "out"
    done = run_cli(str(tiny_run), "--out", str(out), *args)
    assert done.returncode == 2 and fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_out_that_exists_is_refused_and_kept(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.gguf").write_text("mine")
    done = run_cli(str(tiny_run), "--out", str(out), "--format", "gguf")
    assert done.returncode == 2 and "is not empty" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.gguf").read_text() == "mine"


def test_an_unsupported_architecture_is_refused_before_any_work(tiny_run, tmp_path):
    from transformers import GPT2Config

    from simpo_lite.config import load_saved_config, save_config

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("gguf"))
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2-base")
    cfg = load_saved_config(run / "config.yaml")
    cfg.model.name_or_path = str(tmp_path / "gpt2-base")
    save_config(cfg, run / "config.yaml")
    done = run_cli(str(run), "--format", "gguf")
    assert done.returncode == 2 and "not 'gpt2'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (run / "gguf").exists()


def test_k_quants_without_llama_cpp_say_what_to_install(tiny_run, tmp_path, monkeypatch):
    from simpo_lite import gguf_export

    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: False)
    with pytest.raises(UserError, match=r"q4_k_m is made by llama.cpp's quantizer, which is not installed: "
                                        r"pip install 'simpo-lite\[gguf\]'"):
        export_run(tiny_run, out=tmp_path / "out", format="gguf", quant="q4_k_m")
    assert not (tmp_path / "out").exists()


# ---- the real llama.cpp on the demo model ------------------------------------------------------------

@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_the_exported_demo_model(tmp_path, quant):
    """SmolLM2-135M-Instruct (the demo's model) with a LoRA adapter, exported and run by llama.cpp."""
    # A small adapter (a trained one moves the model, it does not scramble it).
    run = tiny_run_folder(tmp_path / "run", Path(smollm2_tokenizer_dir()),
                          sets=["export.merge_into=original", "export.dtype=fp32"], std=0.02)
    result = export_run(run, out=tmp_path / "gguf", format="gguf", quant=quant)
    found = result.gguf["llama_cpp"]
    assert found["same_tokens"]
    assert found["top1"] >= (0.95 if quant == "q8_0" else 0.7), found
    if quant == "q8_0":  # q4_k_m's first different token comes early on this model (README's table)
        assert found["greedy_agreement"] > 0.5, found
