import subprocess
import sys
import time

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, cwd=cwd)


def test_help_is_fast_and_does_not_import_torch():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from simpo_lite.cli import app, main; "
                          "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False False"
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout
    assert time.perf_counter() - start < 5  # two interpreter starts; --help alone is ~0.3 s


def test_the_command_list_shows_every_summary_whole():
    """Piped help is 80 columns wide; click cuts a summary that does not fit with '...'."""
    result = run_cli("--help")
    commands = result.stdout.split("Commands:")[1].strip().splitlines()
    assert len(commands) == 10 and not [line for line in commands if line.rstrip().endswith("...")]


def test_presets_list_and_show():
    listing = run_cli("presets", "list")
    assert listing.returncode == 0
    for name in ("llama3-8b-lora", "smollm2-demo", "gemma2-9b-lora"):
        assert name in listing.stdout
    shown = run_cli("presets", "show", "llama3-8b-lora")
    assert shown.returncode == 0 and "gamma_beta_ratio: 0.55" in shown.stdout


@pytest.mark.parametrize("args, fragment", [
    (["presets", "show", "lama3-8b-lora"], "did you mean llama3-8b-lora"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["train", "--config", "/no/such/file.yaml"], "not found"),
    (["train", "--set", "simpo.bta=1"], "did you mean 'simpo.beta'"),
    (["train", "--set", "train.learning_rate=abc"], "train.learning_rate must be a number"),
    (["train", "--max-steps", "x"], "--max-steps"),
    (["plan", "--set", "lora.r=-1"], "lora.r"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_training_with_every_pair_held_out_is_refused_before_the_run_folder(tmp_path):
    result = run_cli("train", "--set", "data.eval_fraction=1", "-o", str(tmp_path / "run"))
    assert result.returncode == 2 and "no training pairs: data.eval_fraction=1 holds every pair" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, inside):
    (tmp_path / "taken").write_text("x")
    result = run_cli("train", "-o", str(tmp_path / "taken" / "run" if inside else tmp_path / "taken"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert f"'{tmp_path / 'taken'}' is a file, not a folder" in errors[0]
    assert "train + " not in result.stderr  # refused before the data was prepared


def test_broken_yaml_reports_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("simpo:\n  beta: [1,\n")
    result = run_cli("train", "--config", str(bad))
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr


def test_every_problem_of_a_config_is_reported(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("simpo:\n  bta: 2\n  loss_type: ipo\ntrain:\n  seeed: 1\n")
    result = run_cli("train", "--config", str(bad))
    assert result.returncode == 2
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 3


def test_debug_shows_traceback():
    result = run_cli("train", "--preset", "nope", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_presets_ship_inside_the_wheel(tmp_path):
    """A plain, non-editable install run from another directory still finds every preset."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root), "-w", str(tmp_path / "w")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "w").glob("*.whl"))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    listing = subprocess.run([sys.executable, "-m", "simpo_lite", "presets", "list"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    for name in ("gemma2-9b-lora", "qwen2.5-7b-lora", "smollm2-demo"):
        assert name[:10] in listing.stdout
    shown = subprocess.run([sys.executable, "-m", "simpo_lite", "presets", "show", "qwen2.5-7b-lora"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert shown.returncode == 0 and "Qwen/Qwen2.5-7B-Instruct" in shown.stdout


def _commands():
    """(path, click command) of every command and group."""
    import typer.main

    from simpo_lite.cli import app

    todo, found = [("simpo-lite", typer.main.get_command(app))], []
    while todo:
        path, command = todo.pop()
        found.append((path, command))
        todo += [(f"{path} {name}", sub) for name, sub in getattr(command, "commands", {}).items()]
    return found


def test_every_option_has_help_and_no_switch_shows_a_bool_metavar():
    for path, command in _commands():
        for param in command.params:
            assert getattr(param, "help", None) or getattr(param, "hidden", False), f"{path} {param.name} has no help text"
    help_text = run_cli("train", "--help").stdout
    assert "--overwrite " in help_text and "<bool>" not in help_text


@pytest.mark.parametrize("command", ["train", "export", "eval", "generate", "chat", "plan", "report", "presets list",
                                     "data inspect"])
def test_dash_h_and_version_everywhere(command):
    from simpo_lite import __version__

    helped = run_cli(*command.split(), "-h")
    assert helped.returncode == 0 and "Usage: simpo-lite" in helped.stdout
    version = run_cli(*command.split(), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"simpo-lite {__version__}"


def test_shared_ideas_have_the_same_flag_everywhere():
    options = {path: {opt for p in command.params for opt in getattr(p, "opts", [])} for path, command in _commands()}
    for command in ("simpo-lite train", "simpo-lite eval", "simpo-lite generate", "simpo-lite plan"):
        assert {"--preset", "--config", "--set"} <= options[command], command
    for command in ("simpo-lite train", "simpo-lite plan", "simpo-lite data inspect"):
        assert "--model" in options[command]
    for command in ("simpo-lite train", "simpo-lite eval", "simpo-lite generate", "simpo-lite data inspect"):
        assert "--data" in options[command]
    assert "--overwrite" in options["simpo-lite train"] and "--overwrite" in options["simpo-lite export"]
    for command in ("simpo-lite generate", "simpo-lite chat"):
        assert {"--max-new-tokens", "--temperature", "--top-p"} <= options[command]


def test_switches_take_true_or_false():
    from simpo_lite.cli import app
    from simpo_lite.cli_args import normalise_argv

    assert normalise_argv(["train", "--overwrite=true", "--quiet=0"], app)[0] == ["train", "--overwrite"]
    bad = run_cli("train", "--overwrite=maybe")
    assert bad.returncode == 2 and "--overwrite=true / --overwrite=false" in bad.stderr
    # An option that takes a value keeps its '=value'.
    assert normalise_argv(["train", "--max-steps=3"], app)[0] == ["train", "--max-steps=3"]


def test_ctrl_c_in_any_command_exits_130_and_says_so(monkeypatch, capsys):
    """typer turns a KeyboardInterrupt into an exit code it returns, not raises, outside standalone mode:
    without a check, an interrupted export or eval exited 0 and a script went on as if it had finished."""
    import simpo_lite.plan_report
    from simpo_lite.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simpo_lite.plan_report, "plan_command", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "smollm2-demo"])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_an_unforeseen_failure_is_one_line_that_offers_the_traceback(monkeypatch, capsys):
    import simpo_lite.plan_report
    from simpo_lite.cli import main

    def broken(*args, **kwargs):
        raise ValueError("Seed must be between 0 and 2**32 - 1\nmore lines of library detail")

    monkeypatch.setattr(simpo_lite.plan_report, "plan_command", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "smollm2-demo"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: unexpected ValueError: Seed must be between 0 and 2**32 - 1 "
                                               "(rerun with --debug for the traceback)")
    with pytest.raises(ValueError):
        main(["plan", "--preset", "smollm2-demo", "--debug"])


@pytest.mark.parametrize("args", [[], ["presets"], ["data"]])
def test_a_command_group_alone_prints_its_help(args):
    result = run_cli(*args)
    assert result.returncode == 0 and result.stdout.startswith("Usage: simpo-lite") and "Commands:" in result.stdout
