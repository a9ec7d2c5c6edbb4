"""`simpo-lite export`: merge, check, save, refuse, fail cleanly, push to a local stand-in for the Hub.

A tiny random Llama (with the bundled SmolLM2 tokenizer and chat template) is trained for a few steps in
4-bit with LoRA, so the adapter is real and its B matrices are non-zero.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml

from simpo_lite.errors import RunError, UserError
from simpo_lite.export import export_run
from tiny_models import random_llama, save_model_folder, save_run_folder, smollm2_tokenizer, tiny_llama_config

PROMPT_IDS = torch.tensor([[1, 520, 2024, 314, 260, 1435, 30, 2, 9, 7, 11]])


# ---- fixtures: a tiny base model and a trained run -----------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    tokenizer = smollm2_tokenizer()
    # A large init scale gives logits of order 1, so a lost or wrongly scaled adapter shows clearly.
    config = tiny_llama_config(tokenizer, max_position_embeddings=256, initializer_range=0.2, pad_token_id=None,
                               tie_word_embeddings=False)
    return save_model_folder(tmp_path_factory.mktemp("tiny-base"), random_llama(config, seed=0), tokenizer)


@pytest.fixture(scope="module")
def run_dir(tiny_base, tmp_path_factory) -> Path:
    from simpo_lite.config import resolve
    from simpo_lite.model import load_model, load_tokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = resolve(sets=[f"model.name_or_path={tiny_base}", f"train.output_dir={run}", "lora.r=4", "lora.alpha=8",
                        "lora.dropout=0", "data.source=HuggingFaceH4/ultrafeedback_binarized", "simpo.beta=2.5",
                        # Most tests check the merge against base + adapter computed independently from the
                        # original weights; the default, dequantized, is tested on its own below.
                        "export.merge_into=original"])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, len(tokenizer), (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_run_folder(run, cfg, model, tokenizer)
    (run / "summary.json").write_text(json.dumps({
        "steps": 3, "train_seconds": 1.5, "peak_mem_mb": 0.0,
        "start_eval": {"eval_loss": 0.7, "eval_rewards/accuracies": 0.5},
        "end_eval": {"eval_loss": 0.5, "eval_rewards/accuracies": 0.8125}}))
    return run


def adapter_model_logits(run: Path, dtype=torch.float32, ids=PROMPT_IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """(base+adapter, base alone) logits, the base loaded in `dtype` and computed in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simpo_lite.config import load_saved_config

    cfg = load_saved_config(run / "config.yaml")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype).float()
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    return with_adapter, without


def plain_logits(folder: Path, ids=PROMPT_IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def card_metadata(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


# ---- merged export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_export(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    return out, export_run(run_dir, out=out, dtype="fp32")


def test_fp32_export_loads_with_plain_transformers_and_matches_the_adapter_model(run_dir, fp32_export):
    from transformers import AutoTokenizer

    out, report = fp32_export

    with_adapter, without = adapter_model_logits(run_dir)
    exported = plain_logits(out)
    effect = (with_adapter - without).abs().max().item()
    assert effect > 0.05, "the adapter should change the logits, or this test could not see a lost merge"
    assert (exported - with_adapter).abs().max().item() < 1e-4
    assert report.merge_diff < 1e-4 and report.adapter_effect > 0.05
    assert report.trained_diff is not None and report.trained_diff > 0  # 4-bit base differs from fp32
    assert 0 <= report.trained_top1 <= 1
    assert report.sample is not None

    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "generation_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert leftovers(out.parent) == []


def test_eval_and_chat_of_an_export_take_the_runs_settings(run_dir, fp32_export):
    """The run's data split and SimPO settings, so the export is scored on the run's held-out pairs and
    not on pairs it trained on; the model is the export itself, unquantized."""
    from simpo_lite.config import load_saved_config
    from simpo_lite.target import resolve_target

    out, _ = fp32_export
    run, target = load_saved_config(run_dir / "config.yaml"), resolve_target(str(out))
    assert (target.cfg.data, target.cfg.simpo, target.cfg.train.seed) == (run.data, run.simpo, run.train.seed)
    assert target.cfg.model.name_or_path == str(out) and target.cfg.model.quantize is False
    assert "model" not in yaml.safe_load((out / "simpo-lite-run.yaml").read_text())  # the training machine's


def test_dequantized_export_is_the_model_the_run_trained(run_dir, fp32_export, tmp_path):
    """export.merge_into=dequantized (the default) merges into the NF4 weights the run trained on: the
    export's logits match the trained 4-bit model far better than a merge into the original weights."""
    from simpo_lite.config import load_saved_config
    from simpo_lite.dequantize import compute_in_fp32
    from simpo_lite.model import load_for_inference

    _, original = fp32_export
    out = tmp_path / "dequantized"
    result = export_run(run_dir, out=out, dtype="fp32", sets=["export.merge_into=dequantized"])
    assert result.merge_into == "dequantized" and original.merge_into == "original"
    assert result.merge_diff < 1e-4  # the merge itself, against dequantized base + adapter
    # The run computes in bf16, the check in fp32: a near-tie position may flip (1 of 115 seen), no more.
    assert result.trained_top1 >= 0.98 and result.trained_top1 > original.trained_top1
    assert result.greedy_agreement >= original.greedy_agreement
    assert result.trained_diff < original.trained_diff / 10
    # Independently: the trained 4-bit model, made to compute in fp32, against the saved export.
    trained = compute_in_fp32(load_for_inference(load_saved_config(run_dir / "config.yaml"), run_dir / "adapter"))
    with torch.no_grad():
        reference = trained(input_ids=PROMPT_IDS).logits.float()
    # bf16 rounding of the dequantized weights (the run computes in bf16 on this CPU) is all that differs.
    assert (plain_logits(out) - reference).abs().max().item() < 0.3 * original.trained_diff
    assert "dequantized" in (out / "README.md").read_text()


def test_bf16_export_is_sharded_and_checked_in_its_own_precision(run_dir, tmp_path):
    out = tmp_path / "merged"
    report = export_run(run_dir, out=out, dtype="bf16", sets=["export.max_shard_size=1MB",
                                                              "export.verify_tolerance=10"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # The reported difference is the rounding of the merged weights, measured against base+adapter with
    # the base in bf16 too; recompute it independently, on the export check's own prompts.
    from transformers import AutoTokenizer

    from simpo_lite.merge import check_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(out)
    recomputed = 0.0
    for ids in check_prompt_ids(tokenizer):
        with_adapter, _ = adapter_model_logits(run_dir, dtype=torch.bfloat16, ids=ids)
        recomputed = max(recomputed, (plain_logits(out, ids) - with_adapter).abs().max().item())
    assert report.merge_diff == pytest.approx(recomputed, rel=0.3, abs=1e-3)
    assert 0 < report.merge_diff < report.adapter_effect


def test_model_card_has_hub_metadata_hyperparameters_and_final_metrics(fp32_export):
    out, _ = fp32_export
    meta = card_metadata(out)
    assert meta["library_name"] == "transformers"
    assert "simpo" in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert "base_model" not in meta  # a local folder is no Hub id
    body = (out / "README.md").read_text()
    assert "| SimPO beta | 2.5 |" in body and "gamma = 1.25" in body
    assert "| eval_rewards/accuracies | 0.5000 | 0.8125 |" in body
    assert "Export check" in body


def test_comparison_measures():
    from simpo_lite.merge import max_diff, top1_agreement

    a = [torch.tensor([[[0.0, 1.0], [2.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]])]
    b = [torch.tensor([[[0.0, 1.5], [0.0, 2.0]]]), torch.tensor([[[1.0, 0.0]]])]
    assert max_diff(a, b) == 2.0
    assert top1_agreement(a, b) == pytest.approx(2 / 3)
    assert top1_agreement(a, a) == 1.0


# ---- adapter only ----------------------------------------------------------------------------

def test_adapter_only_export_loads_on_the_base_and_keeps_the_adapter(run_dir, tmp_path):
    from peft import PeftModel

    from simpo_lite.config import load_saved_config
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter-out"
    report = export_run(run_dir, out=out, adapter_only=True)
    assert report.merge_diff is None
    assert not (out / "model.safetensors").exists()
    exported = load_file(out / "adapter_model.safetensors")
    trained = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert card_metadata(out)["library_name"] == "peft"
    quantized = load_saved_config(run_dir / "config.yaml").model.quantize
    assert ("trained on the 4-bit NF4 quantization of the base" in (out / "README.md").read_text()) == quantized

    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=PROMPT_IDS).logits
    with_adapter, _ = adapter_model_logits(run_dir)
    assert (got - with_adapter).abs().max().item() < 1e-5


def test_default_out_is_inside_the_run(run_dir):
    report = export_run(run_dir, adapter_only=True, force=True)
    assert report.out == run_dir / "adapter-export" and (run_dir / "adapter-export" / "README.md").is_file()


# ---- safety: refusals and failures leave nothing behind ---------------------------------------

def test_refuses_a_non_empty_out_without_force_and_replaces_it_with_force(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty: add --overwrite"):
        export_run(run_dir, out=out, adapter_only=True)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(run_dir, out=out, adapter_only=True, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["run", "parent", "adapter", "base"])
def test_refuses_an_out_that_would_destroy_the_inputs_even_with_force(run_dir, tiny_base, where):
    out = {"run": run_dir, "parent": run_dir.parent, "adapter": run_dir / "adapter", "base": tiny_base}[where]
    with pytest.raises(UserError, match="choose another folder"):
        export_run(run_dir, out=out, adapter_only=True, force=True)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (tiny_base / "config.json").is_file()


def test_failed_merge_check_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RunError, match="merge check failed.*--dtype fp32") as err:
        export_run(run_dir, out=out, dtype="bf16", sets=["export.verify_tolerance=0.000001"])
    assert "\n" not in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_failure_with_force_keeps_the_previous_export(run_dir, tmp_path, monkeypatch):
    from simpo_lite import hub

    out = tmp_path / "out"
    export_run(run_dir, out=out, adapter_only=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "write_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        export_run(run_dir, out=out, adapter_only=True, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("make, fragment", [
    (lambda tmp, run: tmp / "nope", "run folder"),
    (lambda tmp, run: tmp, "no config.yaml"),
])
def test_bad_run_folders_are_user_errors(run_dir, tmp_path, make, fragment):
    with pytest.raises(UserError, match=fragment):
        export_run(make(tmp_path, run_dir))


def test_a_run_without_adapter_is_a_user_error(run_dir, tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    # Stopped before its first checkpoint: --resume would find nothing, so it is not offered.
    with pytest.raises(UserError, match="no adapter/ and no checkpoint: the run stopped before its first one.*"
                                        "--overwrite"):
        export_run(tmp_path)
    from simpo_lite import run_folder

    monkeypatch.setattr(run_folder, "newest_intact", lambda folder: folder / "checkpoint-2")  # one to resume from
    with pytest.raises(UserError, match="no adapter/: the run has not finished; use one of its checkpoint-N.*--resume"):
        export_run(tmp_path)


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/missing"], "run folder '{tmp}/missing' not found"),
    (["{run}", "--set", "export.verify_tolerence=1"], "did you mean 'export.verify_tolerance'"),
    (["{run}", "--private"], "--private makes the Hub repository of --push-to-hub private"),
])
def test_cli_reports_user_errors_on_one_line(run_dir, tmp_path, args, fragment):
    fill = lambda text: text.format(tmp=tmp_path, run=run_dir)  # noqa: E731
    result = subprocess.run([sys.executable, "-m", "simpo_lite", "export", *map(fill, args)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fill(fragment) in errors[0] and "Traceback" not in result.stderr


def test_bad_dtype_is_a_user_error(run_dir, tmp_path):
    with pytest.raises(UserError, match="--dtype 'fp8'.*bf16, fp16, fp32"):
        export_run(run_dir, out=tmp_path / "x", dtype="fp8")


# ---- pushing, against a local stand-in for the Hub API -----------------------------------------

class HubStandIn(ThreadingHTTPServer):
    """Just enough of the Hub HTTP API for whoami, create_repo, repo_info and upload_folder with regular
    (inline, base64) uploads; it records every call and stores the uploaded files."""

    def __init__(self, token: str, role: str = "write"):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.token, self.role = token, role
        self.calls: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.repos: dict[str, dict] = {}
        self.cards: list = []  # README.md metadata as validated

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
        hub: HubStandIn = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlparse(self.path).path
        if path == "/api/agent-harnesses":  # huggingface_hub's own housekeeping, unrelated to the upload
            return self._json(404, {})
        hub.calls.append((method, path))
        hub.auth_headers.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        if (method, path) == ("GET", "/api/whoami-v2"):
            return self._json(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": hub.role}}})
        if (method, path) == ("POST", "/api/repos/create"):
            data = json.loads(body)
            repo = f"{data.get('organization') or 'tester'}/{data['name']}"
            if repo in hub.repos:
                return self._json(409, {"error": "You already created this model repo"})
            hub.repos[repo] = {"private": data.get("visibility") == "private", "files": {}}
            return self._json(200, {"url": f"{hub.url}/{repo}"})
        if (method, path) == ("POST", "/api/validate-yaml"):  # upload_folder checks README.md metadata first
            return self._validate_card(json.loads(body)["content"])
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit)/main)?", path)
        if not match or match.group(1) not in hub.repos:
            return self._json(404, {"error": f"{method} {path} is not in the stand-in"})
        repo, action = match.groups()
        if action is None and method == "GET":
            return self._json(200, {"id": repo, "private": hub.repos[repo]["private"], "sha": "0" * 40})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        for line in body.splitlines():  # commit: one NDJSON item per line
            item = json.loads(line)
            if item["key"] == "file":
                hub.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})


    def _validate_card(self, content: str) -> None:
        meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
        ok = (isinstance(meta, dict) and all(isinstance(t, str) for t in meta.get("tags", []))
              and all(isinstance(meta.get(k, ""), str) for k in ("base_model", "library_name", "pipeline_tag")))
        self.server.cards.append(meta)
        if not ok:
            return self._json(400, {"errors": [{"message": f"invalid metadata: {meta!r}"}]})
        return self._json(200, {"warnings": []})


SECRET = "hf_standin_secret_token_0123456789"


@pytest.fixture
def hub_standin(monkeypatch):
    from huggingface_hub import constants

    server = HubStandIn(token=SECRET)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import: point its constants here.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.shutdown()
    server.server_close()


def test_push_uploads_the_export_with_the_token_and_writes_the_token_nowhere(run_dir, tmp_path, hub_standin, capfd):
    out = tmp_path / "merged"
    report = export_run(run_dir, out=out, dtype="fp32", push_to_hub="tester/tiny-simpo", private=True)

    assert report.hub_url == f"{hub_standin.url}/tester/tiny-simpo"
    repo = hub_standin.repos["tester/tiny-simpo"]
    assert repo["private"] is True
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    # every file of the export, byte for byte, but the run's config: it holds the uploader's local paths
    assert repo["files"] == {name: data for name, data in local.items() if name != "simpo-lite-run.yaml"}
    assert "simpo-lite-run.yaml" in local
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "generation_config.json"} <= set(local)
    assert "tester/tiny-simpo" in (out / "README.md").read_text()
    assert hub_standin.cards and "simpo" in hub_standin.cards[0]["tags"]
    assert hub_standin.calls[0] == ("GET", "/api/whoami-v2")
    assert ("POST", "/api/models/tester/tiny-simpo/commit/main") in hub_standin.calls
    assert set(hub_standin.auth_headers) == {f"Bearer {SECRET}"}

    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_push_checks_the_token_before_any_work(run_dir, tmp_path, hub_standin, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(UserError, match="Hub refused to check the token \\(HTTP 401\\)") as err:
        export_run(run_dir, out=tmp_path / "merged", push_to_hub="tester/x")
    assert "hf_wrong" not in str(err.value)
    assert not (tmp_path / "merged").exists() and hub_standin.calls == [("GET", "/api/whoami-v2")]


def test_push_with_a_read_only_token_is_refused(run_dir, tmp_path, hub_standin):
    hub_standin.role = "read"
    with pytest.raises(UserError, match="read-only"):
        export_run(run_dir, out=tmp_path / "merged", push_to_hub="tester/x")
    assert not (tmp_path / "merged").exists()


def test_private_push_never_lands_in_an_existing_public_repo(run_dir, tmp_path, hub_standin):
    hub_standin.repos["tester/public"] = {"private": False, "files": {}}
    with pytest.raises(UserError, match="exported to .* but not pushed: .*already exists and is public"):
        export_run(run_dir, out=tmp_path / "a", adapter_only=True, push_to_hub="tester/public", private=True)
    assert hub_standin.repos["tester/public"]["files"] == {}
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()  # the local export stays usable


def test_missing_token_is_a_one_line_user_error_before_any_work(run_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match="needs a Hugging Face token.*HF_TOKEN.*hf auth login") as err:
        export_run(run_dir, out=tmp_path / "merged", push_to_hub="tester/x")
    assert "\n" not in str(err.value) and not (tmp_path / "merged").exists()


def test_unreachable_hub_is_a_one_line_user_error(run_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub") as err:
        export_run(run_dir, out=tmp_path / "merged", push_to_hub="tester/x")
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


def test_offline_mode_is_reported_as_such(run_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*offline mode"):
        export_run(run_dir, out=tmp_path / "merged", push_to_hub="tester/x")


def test_export_is_readable_by_others_like_any_new_file(run_dir, tmp_path):
    import os
    import stat

    out = tmp_path / "adapter-out"
    export_run(run_dir, out=out, adapter_only=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.iterdir())


# ---- before merging: memory and base-model checks ----------------------------------------------

def test_low_memory_is_warned_about(run_dir, monkeypatch):
    from collections import namedtuple

    import psutil

    from simpo_lite.config import load_saved_config
    from simpo_lite.merge import check_memory, parameter_count

    cfg = load_saved_config(run_dir / "config.yaml")
    params = parameter_count(cfg)
    assert params > 3_000_000  # mostly the 49k x 64 embedding and head
    said: list[str] = []
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=params * 4))
    check_memory(cfg, said.append)
    assert said and "GiB of RAM" in said[0] and "checked in fp32" in said[0]
    said.clear()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=params * 8))
    check_memory(cfg, said.append)
    assert said == []


def test_a_pre_quantized_base_is_refused(run_dir, tiny_base, tmp_path):
    from simpo_lite.config import load_saved_config
    from simpo_lite.merge import parameter_count

    base = tmp_path / "quantized-base"
    base.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    cfg = load_saved_config(run_dir / "config.yaml")
    cfg.model.name_or_path = str(base)
    with pytest.raises(UserError, match="stored quantized.*--adapter-only"):
        parameter_count(cfg)


@pytest.mark.parametrize("diff, effect, passes", [
    (1.44, 25.8, True),    # the demo's bf16 export at step 15: 6% of the adapter's effect rounded away
    (0.67, 1.7, False),    # a weak adapter, 39% of its effect lost to bf16
    (1.6, 1.7, False),     # the adapter lost whole: the export is the base
])
def test_a_16_bit_export_may_round_away_a_quarter_of_the_adapters_effect(diff, effect, passes):
    from types import SimpleNamespace

    from simpo_lite.config import resolve
    from simpo_lite.merge import check_tolerance

    result = SimpleNamespace(merge_diff=diff, adapter_effect=effect, out="OUT")
    if passes:
        check_tolerance(result, resolve(), "bf16")
        return
    with pytest.raises(RunError, match=rf"loses {diff / effect:.0%} of the fine-tune's largest effect.*"
                                       rf"--dtype fp32, or accept the loss with --set export.verify_tolerance="):
        check_tolerance(result, resolve(), "bf16")
