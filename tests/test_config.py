import pytest
import yaml

from simpo_lite import config as cfgmod
from simpo_lite.errors import ConfigError, UserError


@pytest.mark.parametrize("name", cfgmod.preset_names())
def test_every_preset_validates(name):
    cfg = cfgmod.resolve(name)
    assert cfg.data.max_prompt_length < cfg.data.max_length


def test_all_required_presets_exist():
    assert {"llama3-8b-lora", "llama3-8b-armorm-lora", "mistral-7b-instruct-lora", "gemma2-9b-lora",
            "qwen2.5-7b-lora", "smollm2-demo"} <= set(cfgmod.preset_names())


@pytest.mark.parametrize("name", cfgmod.preset_names())
def test_presets_cite_a_source_for_their_numbers(name):
    text = cfgmod.preset_path(name).read_text()
    assert text.lstrip().startswith("#")
    assert "source" in text.lower() or "tuned" in text.lower()


def test_layers_apply_in_order(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"simpo": {"beta": 3.0}, "train": {"seed": 1, "max_steps": 7}}))
    cfg = cfgmod.resolve("llama3-8b-lora", str(config_file), {"train": {"seed": 2}}, ["train.seed=3"])
    assert cfg.simpo.beta == 3.0                      # file beats preset (2.5)
    assert cfg.simpo.gamma_beta_ratio == 0.55         # preset beats default (0.5)
    assert cfg.train.max_steps == 7                   # file beats default
    assert cfg.train.seed == 3                        # --set beats flag beats file
    assert cfg.train.weight_decay == 0.0              # default survives


def test_unknown_keys_and_wrong_types_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("simpo:\n  bta: 2\ntrain:\n  learning_rate: fast\nmodle: {}\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.resolve(config_file=str(bad), sets=["lora.rank=8"])
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 4
    assert "'simpo.bta'" in text and "did you mean 'simpo.beta'" in text
    assert "train.learning_rate must be a number" in text
    assert "unknown section 'modle'" in text and "'model'" in text
    assert "'lora.rank'" in text


def test_key_in_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError, match=r"belongs to section 'simpo'"):
        cfgmod.resolve(sets=["train.gamma_beta_ratio=0.3"])


def test_set_parses_yaml_values_and_keeps_strings():
    cfg = cfgmod.resolve(sets=["lora.target_modules=[q_proj, v_proj]", "model.revision=1234",
                               "train.max_steps=null", "model.quantize=false"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.revision == "1234"
    assert cfg.train.max_steps is None and cfg.model.quantize is False


@pytest.mark.parametrize("assignment, fragment", [
    ("train.warmup_ratio=1.0", "train.warmup_ratio"),
    ("simpo.beta=0", "simpo.beta"),
    ("simpo.loss_type=ipo", "simpo.loss_type"),
    ("data.max_prompt_length=4096", "data.max_prompt_length"),
    ("train.micro_batch_size=true", "train.micro_batch_size"),
])
def test_invalid_values_name_the_key(assignment, fragment):
    with pytest.raises(ConfigError) as err:
        cfgmod.resolve("smollm2-demo", sets=[assignment])
    assert fragment in str(err.value)


def test_hinge_with_label_smoothing_warns():
    with pytest.warns(UserWarning, match="label_smoothing is ignored"):
        cfgmod.resolve(sets=["simpo.loss_type=hinge", "simpo.label_smoothing=0.1"])


def test_unknown_preset_suggests_closest():
    with pytest.raises(UserError, match="did you mean llama3-8b-lora"):
        cfgmod.preset_path("llama3-8b-lora2")


def test_saved_config_round_trips(tmp_path):
    cfg = cfgmod.resolve("gemma2-9b-lora", sets=["simpo.beta=7.5"])
    cfgmod.save_config(cfg, tmp_path / "config.yaml")
    assert cfgmod.load_saved_config(tmp_path / "config.yaml") == cfg
    assert cfgmod.resolve(config_file=str(tmp_path / "config.yaml")) == cfg


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; a learning rate written that way must still work.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-5\n")
    assert cfgmod.resolve(config_file=str(path), sets=["export.verify_tolerance=1e-6"]).train.learning_rate == 1e-5
    with pytest.raises(ConfigError, match="train.learning_rate must be a number"):
        cfgmod.resolve(sets=["train.learning_rate=fast"])


def test_other_tools_names_and_bare_keys_point_to_the_setting(tmp_path):
    with pytest.raises(ConfigError) as err:
        cfgmod.resolve(sets=["beta=2", "lr=1e-4", "gamma=1.4", "train.per_device_train_batch_size=2", "lora.rank=8",
                             "train.bf16=true"])
    assert err.value.problems == [
        "--set 'beta=2': expected section.key=value; did you mean --set simpo.beta=2?",
        "--set 'lr=1e-4': expected section.key=value; did you mean --set train.learning_rate=1e-4?",
        # TRL's gamma is the margin itself: its value is not ours
        "--set 'gamma=1.4': expected section.key=value; did you mean --set simpo.gamma_beta_ratio=...? "
        "(the target margin divided by simpo.beta)",
        "--set: unknown key 'train.per_device_train_batch_size'; simpo-lite calls it 'train.micro_batch_size'",
        "--set: unknown key 'train.bf16'; simpo-lite calls it 'train.mixed_precision' (auto, no, bf16 or fp16)",
        "--set: unknown key 'lora.rank'; simpo-lite calls it 'lora.r'"]
    flat = tmp_path / "flat.yaml"
    flat.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"'learning_rate' goes under its section: train: learning_rate"):
        cfgmod.resolve(config_file=str(flat))


def test_a_set_value_that_is_broken_yaml_is_reported_not_taken_as_text():
    with pytest.raises(ConfigError, match=r"lora.target_modules=\[q_proj,v_proj'.*not valid YAML"):
        cfgmod.resolve(sets=["lora.target_modules=[q_proj,v_proj"])
    assert cfgmod.resolve(sets=["model.revision=[odd"]).model.revision == "[odd"  # a string field takes any text


def test_yaml_yes_no_words_reach_settings_that_take_them(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1 reads `no` as false
    assert cfgmod.resolve(config_file=str(file)).train.mixed_precision == "no"
    assert cfgmod.resolve(sets=["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert cfgmod.resolve(sets=["lora.layers=3"]).lora.layers == [3]


def test_a_folder_given_as_config_file_points_to_its_config_yaml(tmp_path):
    with pytest.raises(UserError, match=r"is a folder; give the path of a .yaml file"):
        cfgmod.resolve(config_file=str(tmp_path))
    (tmp_path / "config.yaml").write_text("train:\n  seed: 1\n")
    with pytest.raises(UserError, match=rf"did you mean '{tmp_path / 'config.yaml'}'"):
        cfgmod.resolve(config_file=str(tmp_path))


def test_a_seed_outside_numpys_range_is_a_config_error():
    for seed in ("-1", str(2**32)):
        with pytest.raises(ConfigError, match=r"train.seed: .* is out of range"):
            cfgmod.resolve(sets=[f"train.seed={seed}"])


def test_the_saved_config_says_how_to_repeat_the_run_without_touching_it(tmp_path):
    cfg = cfgmod.resolve(flags={"train": {"output_dir": str(tmp_path / "run")}})
    cfgmod.save_config(cfg, tmp_path / "elsewhere.yaml")
    first = (tmp_path / "elsewhere.yaml").read_text().splitlines()[0]
    assert first.endswith(f"--config {tmp_path / 'run' / 'config.yaml'} --output-dir {tmp_path / 'run'}-again")



def test_quoted_or_spaced_values_of_a_choice_still_read():
    cfg = cfgmod.resolve(sets=['simpo.loss_type="hinge"', "train.on_collapse= stop"])
    assert (cfg.simpo.loss_type, cfg.train.on_collapse) == ("hinge", "stop")
