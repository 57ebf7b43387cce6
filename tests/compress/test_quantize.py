"""Quantized students: QAT gradients (our fake quantization), degradation, save/load round trip in
optimum-quanto's format, LoRA base."""

import copy

import pytest
import torch
from optimum.quanto import QModuleMixin

from hf_sdft.compress import get_degradation
from hf_sdft.compress.fake_quant import FakeQuantLinear
from hf_sdft.compress.quantize import load_quantized, quantize_student, save_quantized, to_quanto
from tests.helpers import make_model, make_texts, make_tokenizer


def batch():
    tok = make_tokenizer()
    enc = tok(make_texts(4, seed=2), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def int_levels(model, name):
    """Distinct dequantized values per output row of a frozen layer: ≤ 2^bits per group."""
    w = model.get_submodule(name).qweight.dequantize()
    return max(len(torch.unique(row)) for row in w)


@pytest.mark.parametrize("bits,levels", [("int8", 256), ("int4", 16), ("int2", 4)])
def test_quantize_qat_and_round_trip(tmp_path, bits, levels):
    teacher = make_model()
    student = quantize_student(copy.deepcopy(teacher), weights=bits)
    b = batch()
    assert isinstance(student.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert type(student.lm_head) is torch.nn.Linear  # excluded by default
    # QAT: float weights stay trainable and get straight-through gradients
    loss = student(**b, labels=b["input_ids"]).loss
    loss.backward()
    grad = student.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        ref, out = teacher(**b).logits, student(**b).logits
    assert not torch.allclose(ref, out)  # it really is degraded
    save_quantized(student, tmp_path)
    assert isinstance(student.model.layers[0].mlp.up_proj, QModuleMixin)  # frozen to quanto's integer weights
    assert int_levels(student, "model.layers.0.mlp.up_proj") <= levels
    reloaded = load_quantized(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**b).logits, student(**b).logits, rtol=0, atol=0)
        torch.testing.assert_close(out, student(**b).logits, rtol=1e-5, atol=1e-5)  # frozen == QAT forward


def test_group_size_changes_the_degradation(tmp_path):
    teacher = make_model(hidden=64)  # in_features 64 and 128
    b = batch()
    errs = {}
    for gs in (16, None):
        s = quantize_student(copy.deepcopy(teacher), weights="int4", group_size=gs)
        with torch.no_grad():
            errs[gs] = (s(**b).logits - teacher(**b).logits).abs().mean().item()
        assert s.model.layers[0].mlp.up_proj.group_size == gs
    assert errs[None] > errs[16]  # one scale per channel is coarser than groups of 16
    s = quantize_student(copy.deepcopy(teacher), weights="int2", group_size=16)
    save_quantized(s, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path)(**b).logits, s(**b).logits, rtol=0, atol=0)


@pytest.mark.parametrize("activations", ["int8", "fp8"])
def test_quantized_activations_with_calibration(tmp_path, activations):
    b = batch()
    s = quantize_student(make_model(), weights="int8", activations=activations, calibration=[b])
    scales = [m.output_scale.item() for m in s.modules() if isinstance(m, QModuleMixin)]
    assert all(x != 1.0 for x in scales)  # calibrated
    with torch.no_grad():
        before = s(**b).logits
    save_quantized(s, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path)(**b).logits, before, rtol=0, atol=0)


def test_lora_on_frozen_quantized_base():
    from peft import LoraConfig, get_peft_model

    s = to_quanto(quantize_student(make_model(), weights="int4"))
    peft_model = get_peft_model(s, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    b = batch()
    loss = peft_model(**b, labels=b["input_ids"]).loss
    loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora" not in n)


def test_quantized_teacher_is_not_mistaken_for_shared_weights():
    from hf_sdft.trainer.teacher import check_teacher

    teacher = to_quanto(quantize_student(make_model(), weights="int4"))  # frozen weights: data_ptr() == 0
    student = to_quanto(quantize_student(make_model(), weights="int4"))
    check_teacher(student, teacher)  # no false "shares weight tensors"
    with pytest.raises(ValueError, match="shares weight tensors"):
        student.model.norm.weight = teacher.model.norm.weight
        check_teacher(student, teacher)


def test_reload_into_another_architecture_fails_loudly(tmp_path):
    import json

    save_quantized(quantize_student(make_model(), weights="int4"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match LlamaForCausalLM built from its config: missing"):
        load_quantized(tmp_path)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported weight bit width 'int3': quanto supports int8, int4, int2"):
        quantize_student(make_model(), weights="int3")
    with pytest.raises(ValueError, match="unsupported weight bit width"):
        get_degradation("quanto", weights="int5")
    with pytest.raises(ValueError, match="has no nn.Linear layer"):
        quantize_student(torch.nn.Sequential(torch.nn.ReLU()), weights="int4")
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_student(make_model(), weights="int8", activations="int8")
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        quantize_student(make_model(), weights="int4", group_size=24)
    with pytest.raises(FileNotFoundError, match="not a quanto checkpoint"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="unknown degradation 'gptq'"):
        get_degradation("gptq")
