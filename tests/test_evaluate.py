"""`simpo-lite eval` on a model folder and on a run.

Expected values are computed here pair by pair from full logits, independently of simpo_lite's
chunked log-probs and loss.
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from simpo_lite.errors import UserError
from tiny_models import tiny_model_folder, tiny_run_folder

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I think it might be Berlin, or Rome."},
    {"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5.", "rejected": "23"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A car."},
    {"prompt": "Say hello politely in French, please.", "chosen": "Bonjour !", "rejected": "Go away."},
    {"prompt": "Is the sun a star?", "chosen": "Yes, the Sun is a star.", "rejected": "No."},
    {"prompt": "Spell cat.", "chosen": "C-A-T.", "rejected": "K-A-T."},
]


@pytest.fixture
def pipeline():
    import simpo_lite.data

    return simpo_lite.data


# ---- fixtures and the independent reference -----------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", sharpen=True)


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def _average_logp(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return logits.log_softmax(-1)[keep].gather(-1, targets[keep].unsqueeze(-1)).mean().item()


def expected_metrics(model, dataset, beta: float, gamma_beta_ratio: float) -> dict:
    """Pair by pair, from full logits, with no padding anywhere."""
    rows = []
    for pair in dataset:
        chosen = _average_logp(model, pair["chosen_input_ids"], pair["chosen_labels"])
        rejected = _average_logp(model, pair["rejected_input_ids"], pair["rejected_labels"])
        margin = beta * (chosen - rejected)
        rows.append({"eval_loss": -F.logsigmoid(torch.tensor(margin - beta * gamma_beta_ratio)).item(),
                     "eval_rewards/chosen": beta * chosen, "eval_rewards/rejected": beta * rejected,
                     "eval_rewards/accuracies": float(chosen > rejected), "eval_rewards/margins": margin,
                     "eval_logps/chosen": chosen, "eval_logps/rejected": rejected})
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def _check(result: dict, target_name: str, sets: list[str], pipeline) -> None:
    from simpo_lite.target import load_target_model, load_target_tokenizer, resolve_target

    target = resolve_target(target_name, sets=sets)
    tokenizer = load_target_tokenizer(target)
    prepared = pipeline.build_datasets(target.cfg.data, tokenizer, target.cfg.train.seed)
    expected = expected_metrics(load_target_model(target), prepared.eval, target.cfg.simpo.beta,
                                target.cfg.simpo.gamma_beta_ratio)
    assert result["eval_pairs"] == len(prepared.eval)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=2e-4), key


# ---- tests ----------------------------------------------------------------------------------------

def test_eval_of_a_model_folder_matches_full_logits(tmp_path, model_dir, pairs_file, pipeline, capsys):
    from simpo_lite.evaluate import evaluate_command

    sets = ["data.eval_fraction=0.5", "train.eval_batch_size=2", "simpo.beta=2.0", "simpo.gamma_beta_ratio=0.3"]
    out = tmp_path / "metrics.json"
    result = evaluate_command(str(model_dir), data=str(pairs_file), sets=sets, out=out)
    assert json.loads(out.read_text()) == result
    _check(result, str(model_dir), [f"data.source={pairs_file}", *sets], pipeline)
    printed = capsys.readouterr()
    assert "eval_rewards/accuracies" in printed.out and "unquantized" in printed.err  # result and message


def test_eval_of_a_run_uses_its_config_and_adapter(tmp_path, model_dir, pairs_file, pipeline):
    from simpo_lite.evaluate import evaluate_command

    run = tiny_run_folder(tmp_path / "run", model_dir,
                          # sft_weight 0: the independent reference computes the pure SimPO loss.
                          sets=[f"data.source={pairs_file}", "data.eval_fraction=0.5", "simpo.beta=3.0",
                                "simpo.sft_weight=0"])
    result = evaluate_command(str(run))
    assert result["beta"] == 3.0 and "4-bit NF4" in result["model"] and "adapter" in result["model"]
    _check(result, str(run), [], pipeline)
    base = evaluate_command(str(model_dir), data=str(pairs_file),
                            sets=["data.eval_fraction=0.5", "simpo.beta=3.0", "model.quantize=true"])
    assert base["eval_logps/chosen"] != pytest.approx(result["eval_logps/chosen"], abs=1e-3)


def test_eval_of_a_checkpoint_folder(tmp_path, model_dir, pairs_file, pipeline):
    from simpo_lite.evaluate import evaluate_command

    run = tiny_run_folder(tmp_path / "run", model_dir, sets=[f"data.source={pairs_file}", "data.eval_fraction=0.5"])
    checkpoint = run / "checkpoint-5"
    checkpoint.mkdir()
    for item in (run / "adapter").iterdir():
        if item.name.startswith("adapter_"):
            (checkpoint / item.name).write_bytes(item.read_bytes())
    (checkpoint / "config.yaml").write_text((run / "config.yaml").read_text())
    from_checkpoint, from_run = evaluate_command(str(checkpoint)), evaluate_command(str(run))
    assert from_checkpoint["model"].startswith("checkpoint")
    for key in from_run:
        if key.startswith("eval_"):
            assert from_checkpoint[key] == pytest.approx(from_run[key], abs=1e-6), key


def test_eval_of_a_file_scores_its_held_out_share_and_says_how_to_score_every_pair(model_dir, pairs_file, pipeline,
                                                                                   capsys):
    from simpo_lite.evaluate import evaluate_command

    held_out = evaluate_command(str(model_dir), data=str(pairs_file), sets=["data.eval_fraction=0.5"])
    assert held_out["eval_pairs"] == len(PAIRS) // 2
    assert "--set data.eval_fraction=1 scores every pair" in capsys.readouterr().err
    every = evaluate_command(str(model_dir), data=str(pairs_file), sets=["data.eval_fraction=1.0"])
    assert every["eval_pairs"] == len(PAIRS) and every["eval_origin"] == "every row"
    assert "scores every pair" not in capsys.readouterr().err


def test_no_eval_pairs_is_a_user_error(model_dir, pairs_file, pipeline):
    from simpo_lite.evaluate import evaluate_command

    with pytest.raises(UserError, match="no eval pairs.*data.eval_split"):
        evaluate_command(str(model_dir), data=str(pairs_file), sets=["data.eval_fraction=0"])


def test_unfinished_run_and_odd_folders_are_user_errors(tmp_path, pipeline):
    from simpo_lite.evaluate import evaluate_command

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="no adapter/ and no checkpoint.*train it again with --overwrite"):
        evaluate_command(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        evaluate_command(str(tmp_path / "empty"))
    (tmp_path / "empty" / "run-q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="holds a GGUF export .*llama.cpp"):
        evaluate_command(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="must end in .json"):
        evaluate_command(str(tmp_path / "empty"), out=tmp_path / "m.txt")


def test_cli_eval_of_a_missing_path_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "simpo_lite", "eval", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
