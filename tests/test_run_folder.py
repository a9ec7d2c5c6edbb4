"""A run folder across runs: --overwrite loses nothing to a typo and leaves nothing of the old run, a
finished run can be trained longer from its last step, an older checkpoint never replaces a newer
adapter, and every refusal names a way on that exists."""

import json
import shutil
from pathlib import Path

import pytest

from tiny_models import short_run_config, tiny_run_inputs, train_config as train, train_losses

from simpo_lite import run_folder
from simpo_lite.errors import UserError
from simpo_lite.resume import find_checkpoint

# 3 steps with a checkpoint every 2: the final state (step 3) is not on the save_steps grid.
RUN = dict(max_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


def config_for(tiny, folder: Path, **train) -> Path:
    return short_run_config(tiny, folder, **{**RUN, **train})


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(run: Path) -> list[dict]:
    return run_folder.read_metrics(run / run_folder.METRICS)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    train(config_for(tiny, root))
    return root / "run"


def copy_run(finished, tiny, tmp_path) -> tuple[Path, Path]:
    """(a copy of the finished run in tmp_path/run, its config)."""
    config = config_for(tiny, tmp_path)
    return shutil.copytree(finished, tmp_path / "run"), config


# ---- --overwrite ------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["data.source", "model.name_or_path", "missing column"])
def test_overwrite_with_a_typo_keeps_the_old_run(finished, tiny, tmp_path, problem):
    run, config = copy_run(finished, tiny, tmp_path)
    before = snapshot(run)
    if problem == "missing column":
        bad = tmp_path / "no_rejected.jsonl"
        bad.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
        sets = [f"data.source={bad}"]
    else:
        sets = [f"{problem}={tmp_path / 'nonexistent'}"]
    with pytest.raises(UserError):
        train(config, overwrite=True, sets=sets)
    assert snapshot(run) == before


def test_overwrite_clears_the_old_runs_exports_and_report_and_keeps_other_files(finished, tiny, tmp_path):
    run, config = copy_run(finished, tiny, tmp_path)
    for name in ("merged", "gguf", "adapter-export", "checkpoint-2.damaged", ".merged.tmp-x1"):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"old")
    (run / "report.png").write_bytes(b"old")
    (run / "notes.txt").write_text("mine")
    train(config, overwrite=True, sets=["train.max_steps=2"])
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["adapter", "checkpoint-2", "config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "notes.txt"])
    assert sorted(train_losses(run)) == [1, 2]


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_is_refused_before_anything_loads(tiny, tmp_path, inside):
    file = tmp_path / "taken"
    file.write_text("x")
    output = file / "sub" if inside else file
    with pytest.raises(UserError, match=f"'{file}' is a file, not a folder.*choose another --output-dir"):
        run_folder.check_output_dir(output, resume=None, overwrite=True)
    assert file.read_text() == "x"


# ---- a finished run's final checkpoint ----------------------------------------------------------------

def test_a_finished_run_trains_longer_from_its_last_step(finished, tiny, tmp_path, capsys):
    assert [p.name for p in run_folder.checkpoints(finished)] == ["checkpoint-2", "checkpoint-3"]
    assert (finished / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == \
        (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    run, config = copy_run(finished, tiny, tmp_path)
    before = records(run)
    train(config, resume="latest", sets=["train.max_steps=5", "train.save_total_limit=1"])
    assert f"resuming from {run / 'checkpoint-3'} (step 3)" in capsys.readouterr().err
    assert records(run)[:len(before)] == before  # steps 1-3 kept as they were, not trained again
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5]
    assert [p.name for p in run_folder.checkpoints(run)] == ["checkpoint-5"]  # save_total_limit holds


def test_a_run_shorter_than_save_steps_can_be_trained_longer(tiny, tmp_path):
    config = config_for(tiny, tmp_path, max_steps=1, save_steps=100, health_prompts=0)
    train(config)
    assert [p.name for p in run_folder.checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    train(config, resume="latest", sets=["train.max_steps=2"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_the_learning_rate_after_a_longer_resume_follows_the_new_schedule(finished, tiny, tmp_path):
    import torch

    from simpo_lite.config import resolve
    from simpo_lite.optim import build_scheduler

    run, config = copy_run(finished, tiny, tmp_path)
    for name in ("checkpoint-3", "adapter", "summary.json"):  # as if stopped after checkpoint-2
        shutil.rmtree(run / name, ignore_errors=True) if name != "summary.json" else (run / name).unlink()
    train(config, resume="latest", sets=["train.max_steps=5"])
    cfg = resolve(config_file=str(config), sets=["train.max_steps=5"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.learning_rate)
    scheduler = build_scheduler(optimizer, cfg.train, 5)
    expected = {}
    for step in range(1, 6):
        expected[step] = scheduler.get_last_lr()[0]  # the lr a step uses is the one before its scheduler step
        optimizer.step()
        scheduler.step()
    logged = {r["step"]: r["lr"] for r in records(run) if "loss" in r}
    assert {s: logged[s] for s in (3, 4, 5)} == pytest.approx({s: expected[s] for s in (3, 4, 5)}, rel=1e-9)


# ---- an older checkpoint than the finished adapter --------------------------------------------------

@pytest.mark.parametrize("max_steps, fragment", [
    (3, "checkpoint-2 is older than the run's finished adapter (step 3)"),
    (2, "resuming from it would discard step 3; train it longer from its last step with --resume --max-steps N"),
    (1, "give more than 3 to train the finished run longer"),
])
def test_an_older_checkpoint_never_replaces_the_finished_adapter(finished, tiny, tmp_path, max_steps, fragment):
    run, config = copy_run(finished, tiny, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError) as caught:
        train(config, resume=str(run / "checkpoint-2"), sets=[f"train.max_steps={max_steps}"])
    assert fragment in str(caught.value), str(caught.value)
    assert snapshot(run) == before


def test_the_end_eval_is_the_last_steps_never_an_earlier_one(tmp_path):
    metrics = [{"step": 0, "eval_loss": 0.7}, {"step": 1, "loss": 0.6}, {"step": 2, "eval_loss": 0.5}]
    (tmp_path / run_folder.METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics))
    at = lambda step: run_folder.TrainerState(step=step, epoch=0, batch_in_epoch=0)  # noqa: E731
    resumed = run_folder.run_summary(tmp_path, at(3), 1.0, 1.0, None, None, tmp_path / "checkpoint-3")
    assert resumed["start_eval"]["step"] == 0 and resumed["end_eval"] is None
    assert run_folder.run_summary(tmp_path, at(2), 1.0, 1.0, None, None, None)["end_eval"]["step"] == 2


def test_the_summary_keeps_every_health_limit_crossed_even_when_the_run_only_warned(tmp_path, capsys):
    """A warn-mode run whose answers lost their facts at step 2 and recovered by step 4 still says so at the
    end, above the export command; and a reward accuracy already at 1 at step 0 is called out."""
    from simpo_lite.config import TrainConfig
    from simpo_lite.progress import outcome_notes

    evals = [{"step": 0, "eval_loss": 0.7, "eval_rewards/accuracies": 1.0, "health/answer_recall": 0.8},
             {"step": 2, "eval_loss": 0.6, "health/answer_recall": 0.2, "health/answer_recall_change": -0.6},
             {"step": 4, "eval_loss": 0.5, "health/answer_recall": 0.8, "health/answer_recall_change": 0.0}]
    (tmp_path / run_folder.METRICS).write_text("".join(json.dumps(r) + "\n" for r in evals))
    state = run_folder.TrainerState(step=4, epoch=0, batch_in_epoch=0)
    summary = run_folder.run_summary(tmp_path, state, 1.0, 1.0, None, None, None, TrainConfig())
    assert len(summary["health_warnings"]) == 1 and "fell by 0.60, from 0.80 to 0.20, at step 2" in summary["health_warnings"][0]
    warning, note = outcome_notes(evals[0], summary["health_warnings"], tmp_path)
    assert warning.startswith("warning: generation health crossed its limits: health/answer_recall fell by 0.60")
    assert warning.endswith(f"read every answer before exporting: simpo-lite report {tmp_path}")
    assert note.startswith("note: reward accuracy was 1.000 at step 0 already")
    assert outcome_notes({"eval_rewards/accuracies": 0.4}, [], tmp_path) == []


def test_report_does_not_advise_a_larger_learning_rate_for_a_run_that_could_not_show_progress(tmp_path):
    from simpo_lite.run_report import _diagnose

    start, end = {"eval_rewards/accuracies": 1.0}, {"eval_rewards/accuracies": 1.0}
    assert not [n for n in _diagnose(start, end, []) if "larger train.learning_rate" in n]
    assert any("cannot show progress" in n for n in _diagnose(start, end, []))
    flat, crossed = {"eval_rewards/accuracies": 0.5}, ["health/answer_recall fell by 0.60 to 0.20 at step 2 (...)"]
    assert not [n for n in _diagnose(flat, dict(flat), crossed) if "larger train.learning_rate" in n]
    assert _diagnose(flat, dict(flat), crossed)[0].startswith("warning: generation health crossed its limits")
    assert "larger train.learning_rate" in _diagnose(flat, dict(flat), [])[0]


# ---- what a refusal suggests ----------------------------------------------------------------------

def fake_run(folder: Path, finished_steps: int | None) -> Path:
    folder.mkdir()
    (folder / "config.yaml").write_text("train: {}\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    if finished_steps:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        (folder / "summary.json").write_text(json.dumps({"steps": finished_steps}))
    return folder


@pytest.mark.parametrize("finished_steps, what", [
    (6, "a finished run (6 steps) with no checkpoint to resume from"),
    (None, "a run that stopped before its first checkpoint"),
])
def test_a_run_without_a_checkpoint_is_never_told_to_resume(tmp_path, finished_steps, what):
    run = fake_run(tmp_path / "run", finished_steps)
    for refuse in (lambda: run_folder.check_output_dir(run, None, False), lambda: find_checkpoint(run, "latest")):
        with pytest.raises(UserError) as caught:
            refuse()
        message = str(caught.value)
        assert what in message and "--overwrite" in message, message
        assert "continue" not in message and "without --resume" not in message, message


def test_a_run_with_a_checkpoint_is_told_how_to_resume(finished):
    with pytest.raises(UserError, match=r"a finished run \(3 steps\): train it longer with --resume --max-steps N"):
        run_folder.check_output_dir(finished, None, False)
    with pytest.raises(UserError, match="holds no run to resume; start without --resume"):
        find_checkpoint(finished.parent / "elsewhere", "latest")


def test_a_resume_may_change_every_guardrail_and_health_setting():
    """They decide when to warn or stop, never what a step computes; a new limit left out of the list
    would refuse the resume of a run stopped by it with a looser limit."""
    import dataclasses

    from simpo_lite.config import TrainConfig
    from simpo_lite.resume import RESUME_MAY_CHANGE

    judged = {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith(("collapse_", "health_", "on_"))}
    assert judged <= RESUME_MAY_CHANGE["train"]
