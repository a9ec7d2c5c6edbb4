import re
import subprocess
import sys
from dataclasses import replace

import pytest

from simpo_lite.config import resolve
from simpo_lite.errors import UserError
from simpo_lite.plan import (GIB, KNOWN_ARCHS, Arch, architecture, arch_from_hf_config, batch_suggestion, estimate,
                             largest_micro_batch, linear_shapes, plan_summary, setting_from_config)

LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"


def _params(arch: Arch) -> int:
    linear = arch.layers * sum(i * o for i, o in linear_shapes(arch).values())
    return linear + arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2) + \
        arch.hidden * (arch.norms_per_layer * arch.layers + 1)


@pytest.mark.parametrize("name, published", [
    # Parameter counts published on each model card / safetensors index.
    (LLAMA3, 8_030_261_248),
    ("mistralai/Mistral-7B-Instruct-v0.2", 7_241_732_096),
    ("google/gemma-2-9b-it", 9_241_705_984),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512 - 28 * (3584 + 2 * 512)),  # minus its q/k/v biases
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008),
])
def test_architecture_table_reproduces_published_parameter_counts(name, published):
    assert _params(KNOWN_ARCHS[name]) == published


def test_every_preset_plans_offline():
    from simpo_lite.config import preset_names

    for name in preset_names():
        cfg = resolve(name)
        summary = plan_summary(cfg)
        assert 0 < summary["tensors"] < summary["peak"] < summary["full_logits_peak"] * 1.001


def test_unknown_model_is_a_user_error():
    cfg = resolve("smollm2-demo", sets=["model.name_or_path=someone/unknown-model-7b"])
    with pytest.raises(UserError, match="no architecture for model 'someone/unknown-model-7b'.*hf download"):
        architecture(cfg.model)


def test_a_local_config_wins_over_the_table(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False).save_pretrained(tmp_path)
    arch = architecture(resolve("smollm2-demo", sets=[f"model.name_or_path={tmp_path}"]).model)
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.head_dim, arch.intermediate, arch.vocab,
            arch.tied_embeddings) == (96, 3, 4, 2, 24, 200, 1000, False)
    assert "config.json" in arch.source


def test_gemma2_config_is_read_with_its_extra_norms_and_soft_caps():
    from transformers import Gemma2Config

    # gemma-2-9b-it's config.json figures; the soft caps and tied embeddings are Gemma2Config's defaults.
    nine_b = Gemma2Config(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                          head_dim=256, intermediate_size=14336, vocab_size=256000)
    arch = arch_from_hf_config(nine_b, "test")
    assert arch.norms_per_layer == 4 and arch.attn_softcap and arch.logit_softcap
    assert replace(arch, source="") == replace(KNOWN_ARCHS["google/gemma-2-9b-it"], source="")


def test_llama3_numbers():
    """Llama-3-8B, 2 pairs x 2048 tokens, r=16 all-linear, paged 8-bit AdamW, bf16, chunk 1024 (README)."""
    cfg = resolve("llama3-8b-lora")
    est = estimate(architecture(cfg.model), setting_from_config(cfg))
    # The reference's figure: one float32 copy of [4, 2048, 128256] logits is 4.2 GB.
    assert est.full_logits / 2 == 4 * 2048 * 128256 * 4 == pytest.approx(4.2e9, rel=0.01)
    # 6.98e9 decoder linear weights at 0.5 B + 1/64 B (+ 1/16384 B) of double-quant constants.
    assert est.base_weights / GIB == pytest.approx(6.98e9 * (0.5 + 1 / 64 + 1 / 16384) / GIB, rel=0.01)
    assert est.lora_params == 41_943_040  # 32 layers x 16 x (sum of in + out of the 7 linears)
    assert est.logp_chunk < est.full_logits / 4
    assert 9 * GIB < est.tensors() < 13 * GIB  # bf16 residual stream on a bf16 GPU (model.frozen_dtype auto)
    assert est.tensors(full_logits=True) - est.tensors() > 2 * GIB


def test_lora_layers_count_only_the_adapted_layers():
    top_8 = ",".join(str(i) for i in range(24, 32))
    cfg = resolve("llama3-8b-lora", sets=[f"lora.layers=[{top_8}]"])
    est = estimate(architecture(cfg.model), setting_from_config(cfg))
    assert est.lora_params == 41_943_040 // 4  # 8 of 32 layers


def test_the_peak_grows_with_the_micro_batch_and_the_chunk():
    cfg = resolve("llama3-8b-lora")
    arch, s = architecture(cfg.model), setting_from_config(cfg)
    peaks = [estimate(arch, replace(s, micro_batch=b)).peak() for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    small = estimate(arch, replace(s, chunk_tokens=128)).logp_chunk
    assert small < estimate(arch, s).logp_chunk


def test_packed_rows_attend_by_segments():
    """llama3-8b-lora (2 pairs x 2048 tokens, bf16 residual stream on a GPU). pack_prompt: 2 rows of
    2 x 2048 tokens, as many tokens as 4 unpacked rows; segment attention needs no mask. pack_tokens 8192
    with a micro-batch of 1 (rows, then): one row of 8192 tokens, as many pairs as fit. Only an eager model
    gets transformers' additive mask, [2, 1, 4096, 4096] bf16 = 64 MiB, and no score tensors."""
    cfg = resolve("llama3-8b-lora")
    arch, s = architecture(cfg.model), setting_from_config(cfg)
    assert (s.micro_batch, s.seq_len, s.residual_bytes, s.pack_prompt) == (2, 2048, 2, False)
    packed, shared_rows = replace(s, pack_prompt=True), replace(s, micro_batch=1, pack_prompt=True, pack_tokens=8192)
    assert (s.rows, s.row_len) == (4, 2048)
    assert (packed.rows, packed.row_len, packed.tokens) == (2, 4096, s.tokens)
    assert (shared_rows.rows, shared_rows.row_len, shared_rows.tokens) == (1, 8192, s.tokens)
    plain = estimate(arch, s)
    assert estimate(arch, packed).decoder_io == estimate(arch, shared_rows).decoder_io == plain.decoder_io
    # A budget of fewer tokens than one pair at its longest: such a pair gets a row of its own.
    assert (replace(s, pack_prompt=True, pack_tokens=1000).rows, replace(s, pack_prompt=True, pack_tokens=1000).row_len) == (2, 4096)
    eager = replace(packed, eager_attention=True)
    assert estimate(arch, eager).decoder_io - plain.decoder_io == 64 * 2**20
    assert estimate(arch, eager).layer_recompute == estimate(arch, packed).layer_recompute
    assert estimate(arch, replace(s, eager_attention=True)).layer_recompute > plain.layer_recompute  # unpacked: scores
    # The config reaches the plan.
    assert setting_from_config(resolve("llama3-8b-lora", sets=["simpo.pack_prompt=true", "simpo.pack_tokens=8192",
                                                               "train.micro_batch_size=1"])) == shared_rows


@pytest.mark.parametrize("budget_gib", [8, 12, 24, 48, 80])
def test_largest_micro_batch_is_the_boundary(budget_gib):
    cfg = resolve("llama3-8b-lora")
    arch, s = architecture(cfg.model), setting_from_config(cfg)
    budget = budget_gib * GIB
    for full in (False, True):
        fit = largest_micro_batch(arch, s, budget, full_logits=full)
        if fit:
            assert estimate(arch, replace(s, micro_batch=fit)).peak(full) <= budget
        assert estimate(arch, replace(s, micro_batch=fit + 1)).peak(full) > budget
    assert largest_micro_batch(arch, s, budget) >= largest_micro_batch(arch, s, budget, full_logits=True)


@pytest.mark.parametrize("effective, fit, expected", [(128, 2, (2, 64)), (128, 3, (2, 64)), (128, 200, (128, 1)),
                                                      (96, 5, (4, 24)), (7, 3, (1, 7))])
def test_batch_suggestion_keeps_the_effective_batch(effective, fit, expected):
    micro, accumulation = batch_suggestion(effective, fit)
    assert (micro, accumulation) == expected and micro * accumulation == effective


def test_plan_follows_how_model_py_loads_a_4bit_model(tmp_path):
    """The plan's dtype for embeddings and the residual stream is the one model.load_model gives them
    (fp32 when peft's prepare_model_for_kbit_training upcast is kept); if loading changes, so must plan."""
    import torch

    from simpo_lite.model import load_model
    from tiny_models import random_llama, tiny_llama_config

    random_llama(tiny_llama_config(num_hidden_layers=1, vocab_size=256)).save_pretrained(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for quantize, frozen in ((True, "fp32"), (True, "compute"), (True, "auto"), (False, "auto")):
        cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={tmp_path}", "model.compute_dtype=bf16",
                                            f"model.quantize={str(quantize).lower()}", f"model.frozen_dtype={frozen}"])
        model = load_model(cfg)
        embedding = model.get_base_model().get_input_embeddings().weight
        hidden = model.get_base_model().model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
        expected = setting_from_config(cfg, device).residual_bytes
        assert embedding.element_size() == hidden.element_size() == expected, (quantize, frozen)


def test_frozen_weights_stay_fp32_only_where_they_are_needed():
    import torch

    from simpo_lite.config import ModelConfig
    from simpo_lite.model import keeps_fp32_frozen_weights as keeps

    auto = ModelConfig()
    assert not keeps(auto, compute=torch.bfloat16)  # bf16 has fp32's range: ~6 GiB saved at 8B, faster on a CPU
    assert keeps(auto, compute=torch.float16)  # fp16 norms can overflow
    assert keeps(auto, compute=torch.float32)  # a CPU without native bf16
    assert keeps(ModelConfig(frozen_dtype="fp32"), compute=torch.bfloat16)
    assert not keeps(ModelConfig(frozen_dtype="compute"), compute=torch.float16)
    assert not keeps(ModelConfig(quantize=False, frozen_dtype="fp32"), compute=torch.bfloat16)


def test_plan_for_llama3_8b_keeps_the_residual_stream_in_bf16_on_a_gpu():
    """Measured on an H200 (benchmarks/results/h200-2026-11-28): 15.47 GiB peak with fp32 frozen weights."""
    arch = architecture(resolve("llama3-8b-lora").model)
    bf16 = estimate(arch, setting_from_config(resolve("llama3-8b-lora"), "cuda"))
    fp32 = estimate(arch, setting_from_config(resolve("llama3-8b-lora", sets=["model.frozen_dtype=fp32"]), "cuda"))
    assert bf16.setting.residual_bytes == 2 and fp32.setting.residual_bytes == 4
    assert fp32.tensors() - bf16.tensors() > 5 * 2**30


def test_checkpointing_fewer_layers_trades_memory_for_recomputation():
    arch = architecture(resolve("llama3-8b-lora").model)
    kept = {n: estimate(arch, setting_from_config(resolve("llama3-8b-lora", sets=[f"model.uncheckpointed_layers={n}"]),
                                                  "cuda")) for n in (0, 1, 16, 99)}
    assert kept[0].checkpoints < kept[1].checkpoints < kept[16].checkpoints < kept[99].checkpoints
    # Each layer that keeps its activations adds the same amount; more than the layers exist adds nothing.
    one_layer = kept[1].checkpoints - kept[0].checkpoints
    assert kept[16].checkpoints - kept[0].checkpoints == pytest.approx(16 * one_layer)
    assert kept[99].checkpoints - kept[0].checkpoints == pytest.approx(32 * one_layer)


def test_cli_plan_prints_the_breakdown_and_the_fit():
    out = subprocess.run([sys.executable, "-m", "simpo_lite", "plan", "--preset", "llama3-8b-lora",
                          "--gpu-memory", "11"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for fragment in ("checkpointed hidden states", "log-probs", "full-logits trainer", "peak (device)",
                     "11 GiB (--gpu-memory)", "does not fit", "gradient_accumulation_steps="):
        assert fragment in out.stdout
    bad = subprocess.run([sys.executable, "-m", "simpo_lite", "plan", "--gpu-memory", "-3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr


def test_a_larger_micro_batch_is_offered_as_a_trade_against_auto_layers():
    """With `auto` layers the spare memory is already spent on layers that are not recomputed: a larger
    micro-batch takes it from them, and the advice says how many auto-fit would then keep."""
    out = subprocess.run([sys.executable, "-m", "simpo_lite", "plan", "--preset", "llama3-8b-lora", "--gpu-memory", "24"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    chosen = re.search(r"auto-fit: .*uncheckpointed_layers=(\d+) of 32", out.stderr)
    trade = re.search(r"Use it with: --set train.micro_batch_size=(\d+) .*\(auto-fit then keeps the activations of "
                      r"(\d+) of 32 layers instead of (\d+):", out.stdout)
    assert chosen and trade, out.stdout + out.stderr
    assert int(trade.group(1)) > 2 and int(trade.group(2)) < int(trade.group(3)) == int(chosen.group(1))


@pytest.mark.e2e
def test_estimate_matches_a_measured_cpu_training_step():
    """One real SimPO step of the 4-bit LoRA SmolLM2-135M on the CPU, 1 pair x 128 tokens, measured
    (tests/plan_measure.py) against the plan for the same run on the CPU (fp32, torch AdamW).

    Measured when written: weights + adapters + optimizer state 216.5 MiB (plan 216.3, -0.1%); the
    step's rise 73.7 MiB with a 1024-token log-prob chunk (plan 67.1, -9%) and 35.7 MiB with a
    32-token chunk (plan 44.5, +25%); peaks 290.2 / 252.1 MiB (plan -2% / +3%).
    Bounds: weights within 2%, the step's rise within -25% / +40%, the peak within -10% / +15%.
    """
    pytest.importorskip("simpo_lite.logprobs")
    from plan_measure import run_in_subprocess

    results = run_in_subprocess([(1, 128, 8, 1024), (1, 128, 8, 32)])
    for r in results:
        assert r["persistent"] / r["static_tensor_bytes"] == pytest.approx(1.0, abs=0.02)
        assert 0.75 <= r["step"] / r["step_rise_bytes"] <= 1.40, r
        assert 0.90 <= r["tensors"] / r["measured_peak_bytes"] <= 1.15, r
    chunked, small = results
    # With a 1024-token chunk the forward pass's log-prob buffer sets the peak; a smaller chunk lowers
    # that forward peak (the backward peak, within 1% of it then, does not depend on the chunk).
    assert chunked["forward_phase"] > chunked["backward_phase"]
    assert small["forward_phase"] < chunked["forward_phase"]
    assert small["step_rise_bytes"] < chunked["step_rise_bytes"]


@pytest.mark.e2e
def test_estimate_of_uncheckpointed_layers_matches_a_measured_cpu_step():
    """The same measurement with gradient checkpointing on and the last 10 of 30 layers keeping their
    activations. Measured when written at 4 pairs x 256 tokens: peak 1730 MiB (plan +14%), 522 MiB with
    every layer checkpointed; here 1 pair x 128 tokens keeps the test short."""
    from plan_measure import run_in_subprocess

    sets = ("model.gradient_checkpointing=true",)
    none, ten = (run_in_subprocess([(1, 128, 8, 256)], sets + (f"model.uncheckpointed_layers={n}",))[0] for n in (0, 10))
    assert ten["measured_peak_bytes"] > none["measured_peak_bytes"]
    for r in (none, ten):
        assert 0.90 <= r["tensors"] / r["measured_peak_bytes"] <= 1.25, r


def test_plan_offers_spare_memory_as_uncheckpointed_layers():
    from simpo_lite.plan import most_uncheckpointed_layers

    cfg = resolve("llama3-8b-lora")
    arch, s = architecture(cfg.model), setting_from_config(cfg, "cuda")
    assert most_uncheckpointed_layers(arch, s, 11 * GIB) == 0  # the default peak is 11.47 GiB
    kept = most_uncheckpointed_layers(arch, s, 24 * GIB)
    assert 0 < kept < arch.layers
    assert estimate(arch, replace(s, uncheckpointed_layers=kept)).peak() <= 24 * GIB
    assert estimate(arch, replace(s, uncheckpointed_layers=kept + 1)).peak() > 24 * GIB
    assert most_uncheckpointed_layers(arch, replace(s, gradient_checkpointing=False), 80 * GIB) == 0
    # Asked for 0, the plan offers them; by default (auto) the run takes them, less the 10% margin.
    offered = plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "24", "--set", "model.uncheckpointed_layers=0")
    assert f"--set model.uncheckpointed_layers={kept}" in offered.stdout
    auto = plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "24")
    taken = most_uncheckpointed_layers(arch, s, 24 * GIB / 1.1)
    assert 0 < taken < kept
    assert f"uncheckpointed_layers={taken} of 32" in auto.stderr and "--set model.uncheckpointed_layers" not in auto.stdout


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "simpo_lite", "plan", *args], capture_output=True, text=True)


def test_largest_max_length_is_the_boundary():
    from simpo_lite.plan import largest_max_length

    cfg = resolve("llama3-8b-lora")
    arch, s = architecture(cfg.model), setting_from_config(cfg, "cuda")
    length = largest_max_length(arch, s, 8 * GIB)
    assert 0 < length < s.seq_len and length % 64 == 0
    one = replace(s, micro_batch=1)
    assert estimate(arch, replace(one, seq_len=length)).peak() <= 8 * GIB
    assert estimate(arch, replace(one, seq_len=length + 64)).peak() > 8 * GIB
    assert largest_max_length(arch, s, 80 * GIB) == s.seq_len  # never longer than configured
    assert largest_max_length(arch, s, 3 * GIB) == 0


def test_when_nothing_fits_plan_says_what_would_and_exits_1():
    out = plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "8")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the longest data.max_length that fits is" in error[0]
    flags = error[0].split(": ")[-1].split()
    assert flags[0] == "--set" and flags[1].startswith("data.max_length=")
    # What it names does fit.
    assert plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "8", *flags).returncode == 0
    # Where no length helps, the line names what to shed.
    tiny = plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "3")
    assert tiny.returncode == 1 and "base linear weights 3.35 GiB" in tiny.stderr and "a smaller model" in tiny.stderr


def test_plan_says_why_the_recommended_micro_batch_is_below_the_largest():
    out = plan_cli("--preset", "llama3-8b-lora", "--gpu-memory", "24")
    assert out.returncode == 0
    assert "up to 7 pairs per micro-batch fit" in out.stdout
    assert "Why 4 and not 7: the effective batch of 128 pairs" in out.stdout
    assert "largest divisor of 128 up to 7" in out.stdout
