"""`auto` micro-batch and uncheckpointed layers: the choice for a budget, the config round trip, resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml
import torch
from tiny_models import tiny_model_folder, write_config, write_pairs

from simpo_lite import autofit
from simpo_lite.config import load_saved_config, resolve, save_config
from simpo_lite.errors import ConfigError, UserError
from simpo_lite.plan import GIB, architecture, estimate, setting_from_config

AUTO = ["train.micro_batch_size=auto", "model.uncheckpointed_layers=auto"]


def peak(cfg, micro: int, layers: int, device: str = "cuda") -> float:
    s = setting_from_config(cfg, device)
    return estimate(architecture(cfg.model), replace(s, micro_batch=micro, uncheckpointed_layers=layers)).peak()


def test_auto_keeps_the_effective_batch_of_the_micro_batch_it_replaces():
    cfg = resolve("llama3-8b-lora", sets=AUTO)  # the preset: 2 pairs x 64 accumulation steps
    assert cfg.train.batch_size == 128
    assert resolve("llama3-8b-lora", sets=AUTO + ["train.gradient_accumulation_steps=8"]).train.batch_size == 16
    assert resolve("llama3-8b-lora", sets=AUTO + ["train.batch_size=32"]).train.batch_size == 32
    with pytest.raises(ConfigError, match=r"train.batch_size \(5\) must equal"):
        resolve("llama3-8b-lora", sets=["train.batch_size=5"])
    with pytest.raises(ConfigError, match="micro_batch_size must be an integer or one of 'auto', got 'many'"):
        resolve("llama3-8b-lora", sets=["train.micro_batch_size=many"])


@pytest.mark.parametrize("budget_gib, micro, layers", [(24, 4, 3), (40, 8, 3), (80, 16, 4)])
def test_the_choice_for_a_gpu_budget_is_the_largest_that_fits_with_the_margin(budget_gib, micro, layers):
    cfg = resolve("llama3-8b-lora", sets=AUTO)
    choice = autofit.choose(cfg, "cuda", budget_gib * GIB)
    assert (choice.micro_batch_size, choice.uncheckpointed_layers) == (micro, layers)
    assert choice.micro_batch_size * choice.gradient_accumulation_steps == 128
    usable = budget_gib * GIB / (1 + autofit.MARGIN)
    assert choice.planned_peak == peak(cfg, micro, layers) <= usable
    # One more layer does not fit; the next divisor of 128 (twice the micro-batch) does not either.
    assert peak(cfg, micro, layers + 1) > usable and peak(cfg, 2 * micro, 0) > usable
    assert f"micro_batch_size={micro} x gradient_accumulation_steps={128 // micro}" in choice.line()


def test_only_the_setting_asked_for_is_chosen():
    cfg = resolve("llama3-8b-lora", sets=["model.uncheckpointed_layers=auto"])
    choice = autofit.choose(cfg, "cuda", 24 * GIB)
    assert (choice.micro_batch_size, choice.gradient_accumulation_steps) == (2, 64)
    usable = 24 * GIB / (1 + autofit.MARGIN)
    assert peak(cfg, 2, choice.uncheckpointed_layers) <= usable < peak(cfg, 2, choice.uncheckpointed_layers + 1)


def test_a_cpu_budget_is_train_memory_budget_gb_less_the_process():
    cfg = resolve("smollm2-demo", sets=AUTO + ["train.memory_budget_gb=3"])
    budget, note = autofit.device_budget(cfg, "cpu")
    assert budget == pytest.approx(3 * GIB - autofit.process_bytes(), rel=0.02) and "train.memory_budget_gb=3" in note
    choice = autofit.choose(cfg, "cpu", budget)
    usable = budget / (1 + autofit.MARGIN)
    # The demo's effective batch is 4 pairs; micro-batches are divisors of it.
    assert peak(cfg, choice.micro_batch_size, 0, "cpu") <= usable
    bigger = {1: 2, 2: 4}.get(choice.micro_batch_size)
    assert bigger is None or peak(cfg, bigger, 0, "cpu") > usable
    default, note = autofit.device_budget(resolve("smollm2-demo"), "cpu")
    assert "half the" in note and default == pytest.approx(autofit.CPU_SHARE * autofit.available_ram()
                                                           - autofit.process_bytes(), rel=0.05)


def test_a_gpu_budget_is_its_free_memory_or_train_memory_budget_gb_where_less(monkeypatch):
    """A 24 GiB budget on an 80 GiB card plans as the 24 GiB card would; a budget above what is free
    cannot be kept, so the free memory stands."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Big GPU")
    free, note = autofit.device_budget(resolve("llama3-8b-lora"), "cuda")
    assert free == 70 * GIB and "free memory of Big GPU" in note
    budget, note = autofit.device_budget(resolve("llama3-8b-lora", sets=["train.memory_budget_gb=24"]), "cuda")
    assert budget == 24 * GIB and "train.memory_budget_gb=24 of the 70.0 GiB free on Big GPU" in note
    over, _ = autofit.device_budget(resolve("llama3-8b-lora", sets=["train.memory_budget_gb=100"]), "cuda")
    assert over == 70 * GIB


def test_the_process_allowance_is_what_it_holds_now_plus_the_load_residue():
    """Read from the resident set: this test process holds more after allocating 200 MiB, and the budget
    left for the plan shrinks by as much."""
    cfg = resolve("smollm2-demo", sets=["train.memory_budget_gb=6"])
    before, _ = autofit.device_budget(cfg, "cpu")
    ballast = torch.ones(200 * 2**20, dtype=torch.uint8)
    after, note = autofit.device_budget(cfg, "cpu")
    assert before - after == pytest.approx(200 * 2**20, rel=0.1)
    assert autofit.process_bytes() > autofit.LOAD_RESIDUE_BYTES + 100 * 2**20  # Python and torch at least
    assert f"less {(6 * GIB - after) / GIB:.2f} GiB for the process itself" in note
    del ballast


def test_nothing_fits_is_one_line_that_says_what_would():
    cfg = resolve("llama3-8b-lora", sets=AUTO)
    with pytest.raises(UserError, match="not even 1 pair x 2048 tokens fits 8.00 GiB.*data.max_length="):
        autofit.choose(cfg, "cuda", 8 * GIB)


def test_the_choice_round_trips_through_config_yaml_and_resume_keeps_it(tmp_path):
    cfg = resolve("llama3-8b-lora", sets=AUTO)
    chosen = autofit.apply(cfg, autofit.choose(cfg, "cuda", 24 * GIB))
    save_config(chosen, tmp_path / "config.yaml", "auto-fit: micro_batch_size: auto -> 4")
    text = (tmp_path / "config.yaml").read_text()
    assert "# auto-fit: micro_batch_size: auto -> 4" in text
    saved = load_saved_config(tmp_path / "config.yaml")
    assert saved == chosen and not autofit.wants_autofit(saved)
    # Resumed with `auto` again, on a GPU with more free memory: the checkpoint's choice, not a new one.
    assert autofit.keep_saved_choice(cfg, saved) == chosen
    assert autofit.keep_saved_choice(cfg, saved) != autofit.apply(cfg, autofit.choose(cfg, "cuda", 80 * GIB))


def test_a_run_records_its_choice_and_its_resume_keeps_it(tmp_path, monkeypatch):
    from simpo_lite.trainer import run_training

    monkeypatch.setattr(autofit, "process_bytes", lambda: 1.0 * GIB)  # this test is about the choice, not the RSS
    model, data = tiny_model_folder(tmp_path / "model", tie=True), write_pairs(tmp_path / "pairs.jsonl", 16)
    config = write_config(tmp_path / "c.yaml", model, data, tmp_path / "run", max_steps=2, save_steps=1,
                          eval_steps=100, health_prompts=0)
    base = resolve(config_file=str(config), sets=AUTO)
    # A budget in which 1 pair fits but 2 do not: micro-batch 1, 2 accumulation steps.
    one = peak(replace(base, train=replace(base.train, micro_batch_size=1),
                       model=replace(base.model, uncheckpointed_layers=0)), 1, 0, "cpu")
    two = peak(replace(base, train=replace(base.train, micro_batch_size=2),
                       model=replace(base.model, uncheckpointed_layers=0)), 2, 0, "cpu")
    gb = (1.0 * GIB + (one + two) / 2 * (1 + autofit.MARGIN)) / GIB
    run_training(resolve(config_file=str(config), sets=AUTO + [f"train.memory_budget_gb={gb}"]), quiet=True)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train"]["micro_batch_size"], saved["train"]["gradient_accumulation_steps"]) == (1, 2)
    assert "auto-fit (simpo_lite.autofit): train.micro_batch_size: auto -> 1" in (tmp_path / "run" / "config.yaml").read_text()
    # Resumed with a budget that would now fit everything: the run goes on with its first choice.
    run_training(resolve(config_file=str(config), sets=AUTO + ["train.memory_budget_gb=64", "train.max_steps=3"]),
                 resume="latest", quiet=True)
    resumed = load_saved_config(tmp_path / "run" / "config.yaml")
    assert (resumed.train.micro_batch_size, resumed.train.gradient_accumulation_steps) == (1, 2)
    assert resumed.model.uncheckpointed_layers == saved["model"]["uncheckpointed_layers"]


def test_layers_are_auto_by_default_and_leave_the_batch_alone():
    cfg = resolve("llama3-8b-lora")
    assert cfg.model.uncheckpointed_layers == "auto" and autofit.wants_autofit(cfg)
    fitted = autofit.apply(cfg, autofit.choose(cfg, "cuda", 24 * GIB))
    assert fitted.train == cfg.train  # batch_size stays null: a resume compares it with the checkpoint's
    assert isinstance(fitted.model.uncheckpointed_layers, int)
    # Without gradient checkpointing (the demo preset) there is nothing to choose: no plan, no line.
    assert resolve("smollm2-demo").model.gradient_checkpointing is False
    assert not autofit.wants_autofit(resolve("smollm2-demo"))
    assert autofit.fit(resolve("smollm2-demo"), "cpu") == (resolve("smollm2-demo"), None)


def test_a_model_the_plan_cannot_read_recomputes_every_layer_unless_the_micro_batch_is_auto():
    cfg = resolve(sets=["model.name_or_path=some-org/not-cached-anywhere"])
    choice = autofit.choose(cfg, "cpu", 8 * GIB)
    assert (choice.uncheckpointed_layers, choice.micro_batch_size) == (0, cfg.train.micro_batch_size)
    assert "uncheckpointed_layers=0" in choice.line() and "some-org/not-cached-anywhere" in choice.line()
    with pytest.raises(UserError, match="no architecture for model 'some-org/not-cached-anywhere'"):
        autofit.choose(resolve(sets=["model.name_or_path=some-org/not-cached-anywhere",
                                     "train.micro_batch_size=auto"]), "cpu", 8 * GIB)


def test_processes_on_one_cpu_share_its_budget():
    cfg = resolve("smollm2-demo", sets=["train.memory_budget_gb=6"])
    one, _ = autofit.device_budget(cfg, "cpu")
    two, note = autofit.device_budget(cfg, "cpu", processes=2)
    assert one - two == pytest.approx(3 * GIB, rel=0.01)
    assert "shared by 2 processes" in note


def test_a_budget_nothing_fits_in_says_so_when_only_the_layers_are_auto():
    choice = autofit.choose(resolve("llama3-8b-lora"), "cuda", 8 * GIB)
    assert choice.uncheckpointed_layers == 0 and "over the budget even with every layer recomputed" in choice.line()
    assert "over the budget" not in autofit.choose(resolve("llama3-8b-lora"), "cuda", 24 * GIB).line()


def test_config_yaml_notes_only_what_auto_fit_chose():
    """The demo preset keeps every layer (no gradient checkpointing): its 'auto' layers stand for nothing,
    and config.yaml said 'auto -> auto'."""
    from simpo_lite.config import resolve
    from simpo_lite.trainer import _auto_note

    demo = resolve("smollm2-demo")
    assert demo.model.uncheckpointed_layers == "auto" and not demo.model.gradient_checkpointing
    assert _auto_note(demo, demo) == ""
    chosen = resolve("smollm2-demo", sets=["train.micro_batch_size=4"])
    assert _auto_note(resolve("smollm2-demo", sets=["train.micro_batch_size=auto"]), chosen) == \
        "auto-fit (simpo_lite.autofit): train.micro_batch_size: auto -> 4"


def test_fsdp_shards_count_in_the_choice():
    """70B over 4 GPUs of 24 GiB: sharded it fits a micro-batch; planned as one GPU holding it all, nothing does."""
    cfg = resolve("llama3-70b-lora", sets=["train.micro_batch_size=auto"])
    sharded = autofit.choose(cfg, "cuda", 24 * GIB, fsdp_processes=4)
    assert sharded.micro_batch_size >= 1 and sharded.planned_peak * (1 + autofit.MARGIN) <= 24 * GIB
    with pytest.raises(UserError, match="not even 1 pair"):
        autofit.choose(cfg, "cuda", 24 * GIB)


def test_a_budget_the_process_already_spends_says_so():
    cfg = resolve("smollm2-demo", sets=["train.micro_batch_size=auto"])
    with pytest.raises(UserError, match=r"no memory is left for the run \(budget note\): raise train.memory_budget_gb"):
        autofit.choose(cfg, "cpu", -0.2 * GIB, "budget note")
