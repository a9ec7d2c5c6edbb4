"""`plan --processes N --fsdp`: the per-GPU terms against hand-computed Llama-3-70B numbers."""

from dataclasses import replace

import pytest

from simpo_lite.config import resolve
from simpo_lite.plan import estimate, setting_from_config
from simpo_lite.plan_arch import KNOWN_ARCHS

ARCH = KNOWN_ARCHS["meta-llama/Meta-Llama-3-70B-Instruct"]


def test_fsdp_shards_weights_and_keeps_constants_and_gathered_copies_whole():
    s = setting_from_config(resolve("llama3-70b-lora"))
    one, two = estimate(ARCH, s), estimate(ARCH, replace(s, fsdp_processes=2))
    linear = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)  # 68,451,041,280 weights
    packed, constants = linear * 0.5, linear * (1 / 64 + 4 / (64 * 256))
    assert one.base_weights == pytest.approx(packed + constants)
    assert two.base_weights == pytest.approx(packed / 2 + constants)  # constants are not FSDP parameters
    head = 2 * 128256 * 8192 * 2 + 8192 * 161 * 2  # bf16 embeddings, head, norms
    assert two.unquantized_weights == pytest.approx(head / 2)
    assert two.fsdp_gathered == pytest.approx(head + 2 * (packed / 80 + one.lora_params / 80 * 4))
    assert two.lora_weights_and_states == pytest.approx(one.lora_weights_and_states / 2)
    assert two.checkpoints == one.checkpoints  # each GPU runs its own micro-batch
    assert two.peak() < one.peak()
