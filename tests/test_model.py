"""model.load_model options that change how training runs but not what it computes."""

import pytest
import torch
from tiny_models import random_llama, tiny_llama_config

from simpo_lite.config import resolve
from simpo_lite.logprobs import concatenated_logps
from simpo_lite.model import load_model


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    random_llama(tiny_llama_config(num_hidden_layers=4, vocab_size=256)).save_pretrained(folder)
    return folder


def _gradients(folder, keep: int, frozen: str = "auto") -> tuple[list[bool], torch.Tensor, dict]:
    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={folder}", "model.compute_dtype=fp32",
                                        f"model.uncheckpointed_layers={keep}", f"model.frozen_dtype={frozen}",
                                        "lora.dropout=0", "model.gradient_checkpointing=true"])
    torch.manual_seed(0)
    model = load_model(cfg)
    model.train()
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    chosen, rejected = concatenated_logps(model, batch, chunk_tokens=7)
    (chosen - rejected).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return flags, torch.cat([chosen, rejected]).detach(), grads


def test_uncheckpointed_layers_recompute_fewer_layers_with_the_same_gradients(four_layer_llama):
    flags_all, logps_all, grads_all = _gradients(four_layer_llama, keep=0)
    flags_half, logps_half, grads_half = _gradients(four_layer_llama, keep=2)
    assert flags_all == [True, True, True, True]
    assert flags_half == [True, True, False, False]  # the last layers: backward frees them first
    torch.testing.assert_close(logps_half, logps_all)
    assert grads_half.keys() == grads_all.keys() and len(grads_all) > 0
    for name in grads_all:
        torch.testing.assert_close(grads_half[name], grads_all[name], msg=name)


def test_frozen_weights_in_the_compute_dtype_leave_4bit_blocks_and_adapters_alone(four_layer_llama):
    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={four_layer_llama}", "model.compute_dtype=bf16",
                                        "model.frozen_dtype=compute"])
    model = load_model(cfg)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # trainable: fp32 master weights
    frozen = {n: d for n, d in dtypes.items() if "lora_" not in n}
    assert frozen and all(d == torch.bfloat16 for d in frozen.values()), frozen


def test_lora_layers_put_adapters_on_the_named_layers_only(four_layer_llama):
    """all-linear with lora.layers: peft refuses the pair as given, so the linear names are spelled out."""
    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={four_layer_llama}", "lora.layers=[2,3]"])
    model = load_model(cfg)
    adapted = {(n.split(".layers.")[1].split(".")[0], n.split(".lora_A")[0].rsplit(".", 1)[-1])
               for n, _ in model.named_parameters() if "lora_A" in n}
    kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted == {(layer, kind) for layer in ("2", "3") for kind in kinds}


def test_lora_layers_beyond_the_model_are_one_clear_error(four_layer_llama):
    from simpo_lite.errors import UserError

    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={four_layer_llama}", "lora.layers=[1,4]"])
    with pytest.raises(UserError, match=r"lora.layers \[4\]: the model has layers 0 to 3"):
        load_model(cfg)


def test_a_revision_of_the_bundled_model_is_refused_not_ignored():
    from simpo_lite.errors import UserError
    from simpo_lite.model_source import resolve_model_source

    with pytest.raises(UserError, match="smollm2-135m-instruct is bundled with simpo-lite.*leave model.revision null"):
        resolve_model_source("smollm2-135m-instruct", revision="v2")
