"""`simpo-lite sweep`: trials equal standalone runs, ranking, disqualification, best.yaml, resume."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_models import tiny_model_folder, train_losses, write_config, write_pairs

from simpo_lite import sweep as sweepmod


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_model_folder(root / "model", tie=True)
    data = write_pairs(root / "pairs.jsonl", 40)
    # Health on, guardrails as shipped except the length ratio, which a random model's answers cross by chance.
    return write_config(root / "c.yaml", model, data, root / "unused", health_prompts=2, health_max_new_tokens=8,
                        collapse_length_ratio=1e6, max_steps=50)


def test_parse_grid_reports_every_problem():
    grid, problems = sweepmod.parse_grid(["train.learning_rate=[1e-4, 3e-4]", "simpo.beta=2", "nokey", "x=[]"])
    assert grid == {"train.learning_rate": [1e-4, 3e-4], "simpo.beta": [2]}
    assert len(problems) == 2 and "nokey" in problems[0] and "empty" in problems[1]


def test_grid_values_the_sweep_would_override_or_run_twice_are_refused():
    _, problems = sweepmod.parse_grid(["train.max_steps=[1,2]", "train.learning_rate=[5e-4,5e-4]",
                                       "simpo.beta=2.5,10"])
    assert "--grid train.max_steps: the sweep sets it for every trial (use --max-steps)" in problems
    assert any("0.0005 given twice" in p for p in problems)
    assert "--grid simpo.beta: write its values as a list, simpo.beta=[2.5,10]" in problems


def test_a_failed_overwrite_gives_the_previous_sweep_back(tiny_config, tmp_path):
    """--overwrite with a mistyped data file: the new sweep fails in its first trial, and the old sweep's
    tables and trials are where they were (before, the folder was left empty)."""
    out = tmp_path / "sw"
    (out / "trial-01").mkdir(parents=True)
    (out / "trial-01" / "metrics.jsonl").write_text("{}\n")
    (out / "sweep.json").write_text('{"definition": {}, "results": {}}')
    res = cli("sweep", "--config", str(tiny_config), "--grid", "train.learning_rate=[1e-3]", "--max-steps", "2",
              "--output-dir", str(out), "--overwrite", "--set", f"data.source={tmp_path / 'nodata.jsonl'}")
    assert res.returncode == 2 and "nodata.jsonl' not found" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "trial-01"]
    assert (out / "trial-01" / "metrics.jsonl").read_text() == "{}\n"


def test_grid_trials_all_combinations_or_a_seeded_draw():
    grid = {"a": [1, 2, 3], "b": ["x", "y"]}
    assert len(sweepmod.grid_trials(grid, None, 0)) == 6
    drawn = sweepmod.grid_trials(grid, 3, 0)
    assert len(drawn) == 3 and drawn == sweepmod.grid_trials(grid, 3, 0)


def test_unknown_grid_key_is_refused_before_anything_runs(tiny_config, tmp_path):
    out = tmp_path / "sw"
    res = cli("sweep", "--config", str(tiny_config), "--grid", "train.learning_rat=[1e-3]", "--max-steps", "2",
              "--output-dir", str(out))
    assert res.returncode == 2, res.stderr
    assert "train.learning_rat" in res.stderr and "learning_rate" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_trials_equal_standalone_runs_and_a_sweep_resumes(tiny_config, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", "--config", str(tiny_config), "--grid", "train.learning_rate=[1e-3,3e-3]",
            "--grid", "simpo.gamma_beta_ratio=[0.5]", "--max-steps", "3", "--train-pairs", "16", "--output-dir", str(out)]
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    # stdout is the sweep's result alone; each trial's own table goes to stderr with its progress.
    assert "sweep ranking" in res.stdout and "run summary" not in res.stdout and "run summary" in res.stderr
    saved = json.loads((out / "sweep.json").read_text())
    assert set(saved["results"]) == {"trial-01", "trial-02"}
    assert all(r["status"] == "ok" for r in saved["results"].values())
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["trial"] for r in rows] == saved["ranking"]
    assert [float(r["train.learning_rate"]) for r in sorted(rows, key=lambda r: r["trial"])] == [1e-3, 3e-3]

    # The second trial reused the loaded base, yet equals the standalone run of its saved config exactly.
    trial = out / "trial-02"
    alone = tmp_path / "alone"
    res = cli("train", "--config", str(trial / "config.yaml"), "--output-dir", str(alone), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert train_losses(alone) == train_losses(trial) and len(train_losses(trial)) == 3

    # Resume: an interrupted sweep (here: the last trial's result removed) runs only what is missing.
    saved["results"].pop("trial-02")
    (out / "sweep.json").write_text(json.dumps(saved))
    again = cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial-01 (" not in again.stderr and "trial-02 (" in again.stderr
    assert "trial-02" in json.loads((out / "sweep.json").read_text())["results"]
    # A different sweep is not a resume of this one; a non-empty folder needs --resume or --overwrite.
    other = cli(*[a if a != "3" else "4" for a in args], "--resume")
    assert other.returncode == 2 and "differs" in other.stderr and "max_steps" in other.stderr, other.stderr
    again = cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_demo_sweep_ranks_and_disqualifies_an_absurd_learning_rate(tmp_path):
    """The demo model in 4-bit, 3 trials x 3 steps: learning rate 1.0 wrecks it (both log-probs fall by
    tens of nats per token); it is disqualified by the generation-health guardrail, never crowned."""
    out = tmp_path / "sw"
    res = cli("sweep", "--preset", "smollm2-demo", "--set", "data.eval_max_pairs=8", "--set", "train.health_prompts=2",
              "--set", "train.health_max_new_tokens=16", "--grid", "train.learning_rate=[2e-4,5e-4,1.0]",
              "--max-steps", "3", "--train-pairs", "16", "--output-dir", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "sweep.json").read_text())
    results = saved["results"]
    assert results["trial-03"]["status"] == "disqualified" and "health/" in results["trial-03"]["reason"]
    assert saved["ranking"][-1] == "trial-03"
    first, second = (results[t] for t in saved["ranking"][:2])
    assert first["status"] == second["status"] == "ok"
    assert (first["eval_rewards/accuracies"], first["eval_rewards/margins"]) >= \
           (second["eval_rewards/accuracies"], second["eval_rewards/margins"])
    assert "disqualified" in res.stdout and f"best: {saved['ranking'][0]}" in res.stdout
    assert (out / "sweep.png").stat().st_size > 10_000
    # best.yaml: the winner's rate on the full run's settings, not the sweep's 3 steps and 16 pairs.
    best = yaml.safe_load((out / "best.yaml").read_text())
    winner = saved["definition"]["trials"][int(saved["ranking"][0][-2:]) - 1]
    assert best["train"]["learning_rate"] == winner["train.learning_rate"]
    assert best["train"]["max_steps"] == 30 and best["data"]["max_train_pairs"] is None
    assert best["train"]["on_collapse"] == "warn"
