"""FSDP over QLoRA, through the shipped accelerate config, on 2 CPU processes (gloo).

accelerate runs FSDP only on GPUs; `fsdp_on_cpu.py` lets its real FSDP1 path run on the CPU (see
there). The run must train, evaluate, save and resume exactly like one unsharded process with two
accumulation steps.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_models import free_port, grad_norms, tiny_model_folder, train_losses, write_config, write_pairs

# These tests stand in for GPUs; on a GPU machine, benchmarks/gpu_check.sh's fsdp stage is the check.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP on CPU processes, for machines without GPUs")

ROOT = Path(__file__).resolve().parent.parent
# What CPU processes cannot honour: FSDP's bf16 mixed precision (its nested wrapping then asks for a
# cpu:0 device). The shipped low-memory loading (only rank 0 reads the checkpoint) runs as on GPUs.
CPU_OVERRIDES = ["--mixed_precision", "no"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def launch_fsdp(config: Path, *extra: str, check: bool = True, launch_args: tuple = ()) -> subprocess.CompletedProcess:
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "presets/accelerate/fsdp-qlora.yaml"), "--num_processes", "2", *CPU_OVERRIDES,
                  "--main_process_port", str(free_port()), *launch_args, str(ROOT / "tests/fsdp_on_cpu.py"), "train",
                  "--config", str(config), "--quiet", *extra])
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One unsharded process with 2 accumulation steps, and FSDP on 2 processes with 1."""
    root = tmp_path_factory.mktemp("fsdp")
    model, data = tiny_model_folder(root / "model"), write_pairs(root / "pairs.jsonl", 40)
    configs = {}
    for name, accumulation in (("single", 2), ("fsdp", 1)):
        path = write_config(root / f"{name}.yaml", model, data, root / name, max_steps=4, save_steps=2,
                            eval_steps=2, gradient_accumulation_steps=accumulation,
                            max_grad_norm=0.6)  # below most steps' norms (about 0.5-0.9), so clipping acts
        cfg = yaml.safe_load(path.read_text())
        cfg["lora"]["dropout"] = 0.0  # each process draws its own dropout masks
        # FSDP keeps embeddings, head and norms in the compute dtype; the reference must too.
        cfg["model"]["frozen_dtype"] = "compute"
        path.write_text(yaml.safe_dump(cfg))
        configs[name] = path
    single = run([sys.executable, "-m", "simpo_lite", "train", "--config", str(configs["single"]), "--quiet"])
    assert single.returncode == 0, single.stderr[-3000:]
    launch_fsdp(configs["fsdp"])
    return root, configs


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_fsdp_two_processes_match_one_process_with_accumulation(runs):
    root, _ = runs
    single, fsdp = train_losses(root / "single"), train_losses(root / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4]
    assert fsdp == pytest.approx(single, rel=1e-4, abs=1e-5)
    evals = [[json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in line] for name in ("single", "fsdp")]
    assert [e["eval_loss"] for e in evals[1]] == pytest.approx([e["eval_loss"] for e in evals[0]], rel=1e-4)
    # The gradient norm is taken over all shards, not one process's.
    assert grad_norms(root / "fsdp") == pytest.approx(grad_norms(root / "single"), rel=1e-4)
    # Only the main process writes: one metrics line per step, not one per process.
    assert len([r for r in (root / "fsdp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]) == 4
    # The sharded adapter is gathered whole, under the keys peft loads.
    expected, gathered = adapter(root / "single"), adapter(root / "fsdp")
    assert sorted(gathered) == sorted(expected)
    for key in expected:
        assert gathered[key].shape == expected[key].shape
        assert (gathered[key] - expected[key]).abs().max() < 1e-5, key


def test_fsdp_run_resumes_exactly(runs):
    root, configs = runs
    resumed = root / "fsdp_resumed"
    shutil.copytree(root / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "adapter")
    launch_fsdp(configs["fsdp"], "--output-dir", str(resumed), "--resume")
    assert train_losses(resumed) == pytest.approx(train_losses(root / "fsdp"), rel=1e-4, abs=1e-5)
    for key, value in adapter(root / "fsdp").items():
        assert (adapter(resumed)[key] - value).abs().max() < 1e-6, key


def test_killed_fsdp_run_resumes_exactly(runs, tmp_path):
    """Both ranks killed at once (a crashed machine) after the first checkpoint: --resume then repeats the
    uninterrupted run, sharded optimizer state included."""
    import time

    root, configs = runs
    cfg = yaml.safe_load(configs["fsdp"].read_text())
    cfg["train"].update(max_steps=12, save_steps=4, eval_steps=12)
    configs12 = {}
    for name in ("full", "killed"):
        cfg["train"]["output_dir"] = str(tmp_path / name)
        configs12[name] = tmp_path / f"{name}.yaml"
        configs12[name].write_text(yaml.safe_dump(cfg))
    launch_fsdp(configs12["full"])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "presets/accelerate/fsdp-qlora.yaml"), "--num_processes", "2", *CPU_OVERRIDES,
                             "--main_process_port", str(free_port()), str(ROOT / "tests/fsdp_on_cpu.py"), "train", "--config", str(configs12["killed"]),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    start = time.time()
    while not (tmp_path / "killed" / "checkpoint-4").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < 600
        time.sleep(0.01)
    # torch's launcher puts each rank in a session of its own: kill every process of this run by its config.
    subprocess.run(["pkill", "-KILL", "-f", str(configs12["killed"])], check=True)
    proc.communicate()
    assert not (tmp_path / "killed" / "adapter").exists()  # killed before the end
    launch_fsdp(configs12["killed"], "--resume")
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == pytest.approx(full, rel=1e-4, abs=1e-5)
    assert grad_norms(tmp_path / "killed") == pytest.approx(grad_norms(tmp_path / "full"), rel=1e-4)


def test_fsdp_checkpoint_resumed_without_fsdp_is_refused(runs, tmp_path):
    root, configs = runs
    copy = tmp_path / "run"
    shutil.copytree(root / "fsdp", copy)
    result = run([sys.executable, "-m", "simpo_lite", "train", "--config", str(configs["fsdp"]),
                  "--output-dir", str(copy), "--resume"])
    assert result.returncode == 2
    assert "written by a run with FSDP" in result.stderr
    assert "simpo_lite/cli.py" not in result.stderr  # our process printed no traceback (the launcher's own is torch's)
    assert (copy / "checkpoint-4" / "optimizer.pt").is_file()  # nothing saved is lost


def test_fsdp_refuses_mixed_precision_that_would_cast_the_4bit_weights(runs, tmp_path):
    _, configs = runs
    result = launch_fsdp(configs["fsdp"], "--output-dir", str(tmp_path / "run"), "--set", "model.compute_dtype=fp32",
                         "--set", "train.mixed_precision=bf16", check=False)
    assert result.returncode != 0
    assert "error: FSDP with mixed precision bf16 would cast the 4-bit weights" in result.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_fsdp2_is_refused_with_a_clear_error(runs, tmp_path):
    _, configs = runs
    result = launch_fsdp(configs["fsdp"], "--output-dir", str(tmp_path / "run"), check=False,
                         launch_args=("--fsdp_version", "2"))
    assert result.returncode != 0
    assert "error: fsdp_version 2 in the accelerate config: simpo-lite supports FSDP1" in result.stderr


def test_fsdp_refuses_the_anchor_with_a_clear_error(runs, tmp_path):
    _, configs = runs
    result = launch_fsdp(configs["fsdp"], "--output-dir", str(tmp_path / "run"), "--set", "simpo.anchor_weight=1",
                         check=False)
    assert result.returncode != 0
    assert "error: simpo.anchor_weight > 0 is not supported under FSDP yet" in result.stderr


def test_shipped_fsdp_config_without_gpus_is_one_clear_error(runs, tmp_path):
    """Launched plainly on a CPU machine (no test launcher): accelerate cannot honour sync_module_states."""
    _, configs = runs
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "presets/accelerate/fsdp-qlora.yaml"), "--num_processes", "1", "-m", "simpo_lite",
                  "train", "--config", str(configs["fsdp"]), "--output-dir", str(tmp_path / "run")])
    assert result.returncode != 0
    assert "error: FSDP launch config without GPUs (accelerate: " in result.stderr
    assert "simpo_lite/cli.py" not in result.stderr  # our process printed no traceback (the launcher's own is torch's)
    assert "this launch config needs GPUs; on the CPU launch DDP instead: torchrun" in result.stderr


def test_low_memory_loading_rank1_never_holds_the_whole_model(tmp_path):
    """The shipped config's cpu_ram_efficient_loading: rank 0 reads and quantizes the checkpoint, rank 1
    builds the model on meta and receives its shard at wrap. Measured as peak resident memory while
    loading and wrapping (fsdp_on_cpu.py), on a model whose 4-bit layers outweigh its embeddings."""
    from tiny_models import random_llama, smollm2_tokenizer, tiny_llama_config

    tokenizer = smollm2_tokenizer()
    model = random_llama(tiny_llama_config(tokenizer, intermediate_size=65536, num_hidden_layers=8,
                                           tie_word_embeddings=True))
    folder = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    config = write_config(tmp_path / "run.yaml", folder, write_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "run",
                          gradient_accumulation_steps=1, max_steps=1)
    memory = tmp_path / "memory"
    memory.mkdir()
    os.environ.update(SIMPO_TEST_MEMORY_DIR=str(memory), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        launch_fsdp(config)
    finally:
        for name in ("SIMPO_TEST_MEMORY_DIR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            del os.environ[name]
    ranks = [json.loads((memory / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = sum(r["shard_bytes"] for r in ranks)  # the wrapped model: 4-bit layers, embeddings, LoRA
    def growth(rank, key):
        before = "resident_before_load_kib" if key.startswith("peak") else "data_before_load_kib"
        return (ranks[rank][key] - ranks[rank][before]) * 1024

    print("whole model {:.1f} MiB; rank 0 / rank 1 above their memory before loading: after load {:.1f} / {:.1f}, "
          "peak {:.1f} / {:.1f}, after wrap {:.1f} / {:.1f} MiB".format(
              whole / 2**20, *[growth(r, key) / 2**20 for key in ("data_after_load_kib", "peak_load_and_wrap_kib",
                                                                  "data_after_wrap_kib") for r in (0, 1)]))
    assert all(abs(r["shard_bytes"] - whole / 2) < 0.05 * whole for r in ranks)  # each keeps half
    assert growth(0, "data_after_load_kib") > whole  # rank 0 held all of it
    assert growth(1, "data_after_load_kib") < 0.2 * whole  # rank 1 none: the skeleton, quantization state
    # Rank 1 receives it unit by unit: its shard plus one unit's copies at a time (materialized,
    # broadcast, flattened), well below rank 0, which reads the checkpoint and holds the whole model.
    assert growth(1, "peak_load_and_wrap_kib") < 0.5 * growth(0, "peak_load_and_wrap_kib")
    assert growth(1, "data_after_wrap_kib") < 0.8 * whole
