"""Two processes (gloo on the CPU) must train exactly like one process with two accumulation steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tiny_models import free_port, grad_norms, tiny_model_folder, train_losses, write_config, write_pairs


def launch(config, nproc: int, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()),
           "-m", "simpo_lite", "train", "--config", str(config), "--quiet", *extra] if nproc > 1 else \
          [sys.executable, "-m", "simpo_lite", "train", "--config", str(config), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return tiny_model_folder(root / "model", tie=True), write_pairs(root / "pairs.jsonl", 40), root


def config_for(setup, name, accumulation, pack_prompt=False, pack_tokens=0):
    model, data, root = setup
    path = write_config(root / f"{name}.yaml", model, data, root / name, max_steps=4, save_steps=2, eval_steps=2,
                        gradient_accumulation_steps=accumulation, micro_batch_size=1 if pack_tokens else 2)
    cfg = yaml.safe_load(path.read_text())
    cfg["lora"]["dropout"] = 0.0  # each process draws its own dropout masks; without dropout the runs must agree
    cfg["simpo"]["pack_prompt"] = pack_prompt
    cfg["simpo"]["pack_tokens"] = pack_tokens
    path.write_text(yaml.safe_dump(cfg))
    return path


def eval_lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]


def test_two_processes_match_one_process_with_accumulation(setup):
    _, _, root = setup
    launch(config_for(setup, "single", accumulation=2), nproc=1)
    launch(config_for(setup, "ddp", accumulation=1), nproc=2)
    single, ddp = train_losses(root / "single"), train_losses(root / "ddp")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert grad_norms(root / "ddp") == pytest.approx(grad_norms(root / "single"), rel=1e-4)
    for a, b in zip(eval_lines(root / "single"), eval_lines(root / "ddp")):
        assert b["eval_rewards/accuracies"] == pytest.approx(a["eval_rewards/accuracies"])
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    # Only the main process writes: one metrics line per step, not one per process.
    assert len([r for r in (root / "ddp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]) == 4


def test_distributed_run_resumes(setup):
    _, _, root = setup
    if not (root / "ddp" / "checkpoint-2").is_dir():
        pytest.skip("needs the two-process run of the test above")
    resumed = root / "ddp_resumed"
    shutil.copytree(root / "ddp", resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "adapter")
    launch(config_for(setup, "ddp", accumulation=1), 2, "--output-dir", str(resumed), "--resume")
    assert train_losses(resumed) == pytest.approx(train_losses(root / "ddp"), rel=1e-4, abs=1e-5)


def test_packed_rows_under_ddp(setup):
    """simpo.pack_prompt keeps decoder and head inside the wrapped forward: DDP still syncs gradients."""
    _, _, root = setup
    launch(config_for(setup, "packed_single", accumulation=2, pack_prompt=True), nproc=1)
    launch(config_for(setup, "packed_ddp", accumulation=1, pack_prompt=True), nproc=2)
    single, ddp = train_losses(root / "packed_single"), train_losses(root / "packed_ddp")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_token_counted_micro_batches_under_ddp(setup):
    """simpo.pack_tokens: micro-batches of one 180-token row hold 2 or 3 pairs (of about 60 tokens), so each
    process weighs its gradient by its share of the step's pairs; 2 processes must still train like 1
    process accumulating the same 2 micro-batches."""
    _, _, root = setup
    launch(config_for(setup, "tokens_single", accumulation=2, pack_prompt=True, pack_tokens=180), nproc=1)
    launch(config_for(setup, "tokens_ddp", accumulation=1, pack_prompt=True, pack_tokens=180), nproc=2)
    single, ddp = train_losses(root / "tokens_single"), train_losses(root / "tokens_ddp")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert grad_norms(root / "tokens_ddp") == pytest.approx(grad_norms(root / "tokens_single"), rel=1e-4)
    pairs = [json.loads(line)["pairs"] for line in (root / "tokens_ddp" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert len(set(pairs)) > 1  # the steps really held different numbers of pairs


def test_two_nodes_over_loopback_match_one_process_with_accumulation(setup):
    """Two "machines" of one process each, joined by torchrun's c10d rendezvous as on a real cluster."""
    _, _, root = setup
    if not (root / "single").is_dir():
        launch(config_for(setup, "single", accumulation=2), nproc=1)
    config, port = config_for(setup, "nodes", accumulation=1), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_id", "simpo-lite-test",
                               "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "-m", "simpo_lite", "train", "--config", str(config), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert train_losses(root / "nodes") == pytest.approx(train_losses(root / "single"), rel=1e-4, abs=1e-5)
    assert grad_norms(root / "nodes") == pytest.approx(grad_norms(root / "single"), rel=1e-4)
