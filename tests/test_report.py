import json
import math
import subprocess
import sys

import pytest

from simpo_lite.errors import UserError
from simpo_lite.run_report import _ema, load_run, report_command, summary_lines


def _eval(step: int, progress: float) -> dict:
    return {"step": step, "epoch": step / 40, "eval_loss": 0.69 - 0.3 * progress,
            "eval_rewards/chosen": -3.0 - 0.2 * progress, "eval_rewards/rejected": -3.0 - 1.4 * progress,
            "eval_rewards/accuracies": 0.5 + 0.3 * progress, "eval_rewards/margins": 1.2 * progress,
            "eval_logps/chosen": -1.2 - 0.08 * progress, "eval_logps/rejected": -1.2 - 0.56 * progress}


def _train(step: int, progress: float) -> dict:
    return {"step": step, "epoch": step / 40, "lr": 1e-4, "loss": 0.7 - 0.3 * progress, "grad_norm": 1.5,
            "rewards/chosen": -3.0, "rewards/rejected": -3.0 - progress, "rewards/accuracies": 0.5 + 0.4 * progress,
            "rewards/margins": progress, "logps/chosen": -1.2, "logps/rejected": -1.2 - 0.4 * progress,
            "tokens_per_s": 1000.0, "step_time_s": 0.5, "peak_mem_mb": 2048.0}


@pytest.fixture
def run(tmp_path):
    records = [_eval(0, 0.0)]
    for step in range(1, 41):
        records.append(_train(step, step / 40))
        if step % 20 == 0:
            records.append(_eval(step, step / 40))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 40, "skipped_steps": 2, "train_seconds": 120.0}))
    return tmp_path


def test_report_writes_a_png_and_summarises(run, capsys):
    png = report_command(run)
    assert png == run / "report.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # six panels of curves, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1200 and height > 700
    text = capsys.readouterr().out
    assert "40 steps" in text and "2.0 min" in text
    assert "reward accuracy 0.5 -> 0.8" in text and "margin 0 -> 1.2" in text
    assert "chosen -1.2 -> -1.28" in text and "both chosen and rejected log-probs fell" in text
    assert "2 steps were skipped" in text and "1000 tokens/s" in text


def test_report_out_path_and_png_check(run, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    assert report_command(run, out=out) == out and out.is_file()
    with pytest.raises(UserError, match="must end in .png"):
        report_command(run, out=tmp_path / "curves.pdf")


def test_report_gives_the_whole_runs_peak_memory_as_train_does(run):
    """The step records stop before the last evaluation, whose generation can raise the peak: report said
    2205 MB where train's end table said 2591 MB for the same run."""
    train, evals, summary = load_run(run)
    assert any("peak memory 2048 MB" in line for line in summary_lines(run, train, evals, summary))
    summary["peak_mem_mb"] = 2591.0
    assert any("peak memory 2591 MB (the whole run, evaluations included)" in line
               for line in summary_lines(run, train, evals, summary))


def test_summary_flags_a_run_that_did_not_learn(run):
    train, evals, summary = load_run(run)
    flat = [dict(e, **{"eval_rewards/accuracies": 0.5}) for e in evals]
    assert any("did not improve" in line for line in summary_lines(run, train, flat, summary))
    assert not any("did not improve" in line for line in summary_lines(run, train, evals, summary))


def test_report_without_eval_lines_or_with_nan_loss(tmp_path):
    records = [_train(s, s / 10) for s in range(1, 11)]
    records[4]["loss"] = float("nan")  # json writes NaN for a skipped non-finite step
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train, evals, summary = load_run(tmp_path)
    lines = summary_lines(tmp_path, train, evals, summary)
    assert any("no eval records" in line for line in lines)
    assert report_command(tmp_path).is_file()


def test_a_half_written_last_line_is_ignored(run):
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 41, "loss": 0.')
    train, _, _ = load_run(run)
    assert train[-1]["step"] == 40


def test_ema_skips_nan():
    smoothed = _ema([1.0, float("nan"), 3.0], span=3)
    assert smoothed[0] == 1.0 and smoothed[1] == 1.0 and smoothed[2] == pytest.approx(2.0)
    assert math.isnan(_ema([float("nan"), 1.0], span=3)[0])


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "has no metrics.jsonl"),
    (lambda p: (p / "metrics.jsonl").write_text(""), "holds no metrics yet"),
    (lambda p: (p / "metrics.jsonl").write_text('{"step": 1}\n{broken\n{"step": 2}\n'), "line 2 is not JSON"),
])
def test_report_errors(tmp_path, setup, fragment):
    setup(tmp_path)
    with pytest.raises(UserError, match=fragment):
        report_command(tmp_path)


def test_a_checkpoint_is_pointed_to_its_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(UserError, match=rf"the report is of the whole run: simpo-lite report {tmp_path}$"):
        report_command(tmp_path / "checkpoint-1")


def test_cli_report_missing_folder_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "simpo_lite", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
