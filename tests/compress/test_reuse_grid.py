"""Issue 27.2: a fake-quantized layer computes its grid once per weight update when it reuses it
(``reuse_grid``; the trainer's ``quant_reuse_grid``), with the values and gradients of computing it
at every forward."""

import copy

import pytest
import torch

import hf_sdft.compress.fake_quant as fq
from hf_sdft.compress.fake_quant import FakeQuantLinear
from hf_sdft.compress.quantize import quantize_student, quantized_modules
from tests.helpers import make_model, make_texts, make_tokenizer, perturb
from tests.trainer.test_trainer import sdft_trainer


def count_fake_quantizations(monkeypatch) -> list:
    """A list that grows by one at every fake_quantize call from now on."""
    calls = []
    original = fq.fake_quantize
    monkeypatch.setattr(fq, "fake_quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def pair(held: bool, symmetric: bool):
    torch.manual_seed(0)
    every = FakeQuantLinear.from_linear(torch.nn.Linear(64, 16), 4, 32, symmetric=symmetric, fp16_scales=True)
    if held:  # a clipped held grid: some weights fall outside it and get no gradient
        every.hold_scales()
        with torch.no_grad():
            every.weight_scale.mul_(0.7)
    reused = copy.deepcopy(every)
    reused.reuse_grid = True
    return every, reused


def accumulate_side_by_side(first, second, x, micro_batches: int) -> None:
    """Forward and backward of both layers on ``micro_batches`` scaled copies of ``x``, their
    outputs equal at each."""
    for micro in range(micro_batches):
        a, b = first(x * (micro + 1)), second(x * (micro + 1))
        assert torch.equal(a, b)
        a.square().sum().backward()
        b.square().sum().backward()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("held", [False, True])
def test_reused_grid_gives_the_same_values_and_gradients(held, symmetric, monkeypatch):
    every, reused = pair(held, symmetric)
    calls = count_fake_quantizations(monkeypatch)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # two optimizer steps of three micro-batches
        accumulate_side_by_side(every, reused, x, 3)
        # the min/max grid passes the gradient unchanged (equal); a held grid computes it as
        # g·scale/scale inside the range, g here: equal up to float32 rounding
        torch.testing.assert_close(reused.weight.grad, every.weight.grad, rtol=1e-5, atol=0)
        if held:
            assert (every.weight.grad == 0).any()  # the range mattered
        optimizers = [torch.optim.AdamW([m.weight], lr=1e-3, foreach=True) for m in (every, reused)]
        for opt in optimizers:  # an optimizer's in-place update does not always move the version counter
            opt.step()
        for m in (every, reused):
            m.weight.grad = None
        fq.forget_grids(reused)
    assert len(calls) == 6 + 2  # every forward, and once per weight update


def test_learned_scales_never_reuse(monkeypatch):
    layer = FakeQuantLinear.from_linear(torch.nn.Linear(64, 16), 4, 32).hold_scales(learnable=True)
    layer.reuse_grid = True
    calls = count_fake_quantizations(monkeypatch)
    layer(torch.randn(2, 64)).sum().backward()
    layer(torch.randn(2, 64)).sum().backward()
    assert len(calls) == 2 and layer.weight_scale.grad is not None


def fake_quantizations_per_step(tmp_path, reuse: str, monkeypatch) -> tuple[int, dict]:
    teacher = make_model(seed=0)
    student = quantize_student(perturb(copy.deepcopy(teacher)), "int4", group_size=32)
    trainer = sdft_trainer(tmp_path, student, teacher, make_tokenizer(), make_texts(32), max_steps=2,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                           quant_reuse_grid=reuse, learning_rate=1e-2)
    calls = count_fake_quantizations(monkeypatch)
    trainer.train()
    return len(calls) // len(quantized_modules(student)), {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_the_trainer_reuses_the_grid_under_accumulation_and_checkpointing(tmp_path, monkeypatch):
    reused, after_reuse = fake_quantizations_per_step(tmp_path / "a", "auto", monkeypatch)
    every, after_every = fake_quantizations_per_step(tmp_path / "b", "false", monkeypatch)
    # two steps, two micro-batches each, each forward run twice (checkpointing's recompute)
    assert every == 2 * 2 * 2 and reused == 2, (every, reused)
    for name, value in after_every.items():
        torch.testing.assert_close(after_reuse[name], value, rtol=0, atol=0, msg=name)  # min/max grid: identical
