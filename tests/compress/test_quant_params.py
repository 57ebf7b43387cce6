"""Quantization parameters beyond quanto's min/max grid: the per-group clipping search and
learnable (LSQ-style) scales and shifts. Both stay on quanto's format: the saved model computes
exactly what was trained."""

import copy

import pytest
import torch
import torch.nn.functional as F
from optimum.quanto import QModuleMixin

from hf_sdft.compress import get_degradation
from hf_sdft.compress.fake_quant import (
    CLIP_RATIOS,
    FakeQuantLinear,
    clip_search,
    code_range,
    fake_quantize,
    minmax_scales,
    quantize_weight,
)
from hf_sdft.compress.quantize import (
    calibration_inputs,
    load_quantized,
    quantize_student,
    save_quantized,
    thaw_quantized,
)
from tests.helpers import make_model, make_texts, make_tokenizer
from tests.trainer.test_trainer import sdft_trainer

from .test_fake_quant import no_compiled_kernels  # noqa: F401  (the fixture)


def train(student, teacher, tmp_path, steps=3, ratio=None):
    extra = {} if ratio is None else {"quant_scales_lr_ratio": ratio}
    trainer = sdft_trainer(tmp_path / "run", student, teacher, make_tokenizer(), make_texts(24), max_steps=steps,
                           learning_rate=1e-2, save_strategy="no", **extra)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters() if "proj" in n)
    return trainer

CLIP_CASES = [(4, 32), (4, None), (2, 16), (8, None)]


def heavy_weight(out, inp, seed):
    """Heavy-tailed rows (outliers, as in LLM weights), where clipping pays."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(2.5))
    torch.manual_seed(seed)
    return (torch.randn(out, inp, generator=g) * t.sample((out, inp)).abs()).float()


def correlated_inputs(tokens, inp, seed):
    g = torch.Generator().manual_seed(seed + 100)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    return (torch.randn(tokens, inp, generator=g) * torch.logspace(-1, 1, inp)) @ mix


def row_errors(x, w, w_hat):
    """‖X (w_o − ŵ_o)‖² per output row, in float64."""
    return (x.double() @ (w.double() - w_hat.double()).T).pow(2).sum(0)


@pytest.mark.parametrize("bits,group_size", CLIP_CASES)
def test_clip_search_never_increases_the_output_error_and_finds_each_groups_best_ratio(bits, group_size):
    """Never worse than the plain grid, row by row (hence per layer); with converged sweeps, no
    group can do better with another ratio of the grid, the others fixed (brute force)."""
    shape = (24, 128)
    size = group_size or shape[1]
    groups = shape[1] // size
    for seed in range(2):
        w, x = heavy_weight(*shape, seed), correlated_inputs(300, shape[1], seed)
        plain = row_errors(x, w, fake_quantize(w, bits, group_size))
        scale, shift, _ = clip_search(w, bits, group_size, x)  # the default sweeps
        clipped = row_errors(x, w, fake_quantize(w, bits, group_size, scale, shift))
        assert (clipped <= plain * (1 + 1e-6)).all()
        scale, shift, ratio = clip_search(w, bits, group_size, x, sweeps=50)
        converged = row_errors(x, w, fake_quantize(w, bits, group_size, scale, shift))
        assert (converged <= plain * (1 + 1e-6)).all()
        if bits != 8:
            assert converged.sum() < 0.95 * plain.sum()  # it does clip the heavy tails
            assert (ratio < 1).any()
        chosen = ratio.reshape(shape[0], groups)
        for g in range(groups):  # brute force: each ratio of the grid in group g, the others as chosen
            for r in CLIP_RATIOS:
                trial = chosen.clone()
                trial[:, g] = r
                s, b = minmax_scales(w, bits, group_size, trial.reshape(-1, 1))
                other = row_errors(x, w, fake_quantize(w, bits, group_size, s, b))
                assert (converged <= other * (1 + 1e-5)).all(), (g, r)
        if group_size is None:  # one group per row: the grid's best ratio, exactly
            brute = torch.stack([row_errors(x, w, fake_quantize(w, bits, None, *minmax_scales(w, bits, None, r)))
                                 for r in CLIP_RATIOS])
            assert torch.allclose(converged, brute.min(0).values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits,group_size", CLIP_CASES)
def test_held_plain_grid_is_quantos_bit_for_bit(bits, group_size):
    w = heavy_weight(48, 128, 3)
    w[0] = 0.0  # scale 0
    layer = FakeQuantLinear(128, 48, bias=False, bits=bits, group_size=group_size)
    layer.weight.data.copy_(w)
    x = torch.randn(5, 128)
    before, codes = layer(x), layer.quantized()[0]
    for learnable in (False, True):
        layer.hold_scales(learnable=learnable)
        assert torch.equal(layer(x), before)
        assert torch.equal(layer.quantized()[0], codes)
    scale, shift, _ = clip_search(w, bits, group_size, torch.randn(64, 128), ratios=(1.0,))
    assert torch.equal(scale, quantize_weight(w, bits, group_size)[1])


def batch(n=4, seed=2):
    enc = make_tokenizer()(make_texts(n, seed=seed), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_calibration_inputs_are_the_layers_inputs():
    model = make_model()
    layer = model.model.layers[0].mlp.down_proj
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    b = batch()
    with torch.no_grad():
        model(**b)
    handle.remove()
    real = seen[0][b["attention_mask"].bool()]
    got = calibration_inputs(model, {"down": layer}, [b], max_tokens=10_000)["down"]
    assert torch.equal(got, real)
    few = calibration_inputs(model, {"down": layer}, [b, batch(seed=3)], max_tokens=8)["down"]
    assert few.shape == (8, layer.in_features)
    assert all(any(torch.equal(row, r) for r in real) for row in few[:4])


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits,group_size", [("int2", 16), ("int4", None)])
def test_clipped_student_trains_saves_and_reloads_exactly(no_compiled_kernels, tmp_path, bits, group_size):
    teacher = make_model()
    student = quantize_student(copy.deepcopy(teacher), bits, group_size=group_size, calibration=[batch()], clip=True)
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert all(m.holds_scales and not m.learns_scales for m in layers)
    assert any((m.clip_ratio < 1).any() for m in layers)
    ids = torch.randint(3, 30, (3, 20))
    plain = quantize_student(copy.deepcopy(teacher), bits, group_size=group_size)
    assert not torch.equal(logits_of(student, ids), logits_of(plain, ids))
    train(student, teacher, tmp_path)
    trained = logits_of(student, ids)
    held = {n: m.weight_scale.clone() for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    save_quantized(student, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q")
    assert (logits_of(reloaded, ids) - trained).abs().max().item() == 0.0
    for name, scale in held.items():
        assert torch.equal(reloaded.get_submodule(name).weight._scale.reshape(-1, 1), scale)
    thawed = thaw_quantized(load_quantized(tmp_path / "q"), hold_scales=True)  # QAT restarts on the saved grid
    assert thawed.model.layers[0].mlp.up_proj.holds_scales
    assert torch.equal(logits_of(thawed, ids), trained)


def lsq_reference(w, x, g, bits, group_size, scale, shift):
    """The LSQ gradients written out in float64, no autograd: dL/dvalue = G; inside the code range
    dvalue/dw = 1, dvalue/dscale = code - (w + shift) / scale, dvalue/dshift = 0; outside 0, code, -1."""
    lo, hi = code_range(bits)
    G = torch.einsum("bo,bi->oi", g, x)
    size = group_size or w.shape[1]
    Gg, wg = G.reshape(-1, size), w.reshape(-1, size)
    v = (wg if shift is None else wg + shift) / scale
    rounded = torch.round(v)
    inside = ((rounded >= lo) & (rounded <= hi)).double()
    code = rounded.clamp(lo, hi)
    grad_w = (Gg * inside).reshape(w.shape)
    grad_scale = (Gg * (code - inside * v)).sum(1, keepdim=True)
    grad_shift = None if shift is None else (Gg * (inside - 1)).sum(1, keepdim=True)
    return grad_w, grad_scale, grad_shift, code


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, 16), (4, None)])
def test_learned_scale_gradients_are_lsqs(bits, group_size):
    torch.manual_seed(0)
    layer = FakeQuantLinear(64, 12, bias=False, bits=bits, group_size=group_size, dtype=torch.float64)
    scale, shift = minmax_scales(layer.weight.detach(), bits, group_size, 0.7)  # clipped: codes at both ends
    layer.hold_scales(scale, shift, learnable=True)
    assert {n for n, p in layer.named_parameters()} == {"weight", "weight_scale"} | ({"weight_shift"} if shift is not None else set())
    x, g = torch.randn(9, 64, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    grad_w, grad_scale, grad_shift, code = lsq_reference(layer.weight.detach(), x, g, bits, group_size, scale, shift)
    lo, hi = code_range(bits)
    assert ((code == lo).any() or lo < 0) and (code == hi).any()  # both kinds of terms are exercised
    torch.testing.assert_close(layer.weight.grad, grad_w)
    torch.testing.assert_close(layer.weight_scale.grad, grad_scale)
    if shift is not None:
        torch.testing.assert_close(layer.weight_shift.grad, grad_shift)
    # finite differences of the straight-through surrogate (rounding offsets frozen) in float64
    w = layer.weight.detach().reshape(-1, group_size or 64)
    v0 = (w if shift is None else w + shift) / scale
    offset, rounded = torch.round(v0) - v0, torch.round(v0)
    inside, code = ((rounded >= lo) & (rounded <= hi)).double(), rounded.clamp(lo, hi)

    def surrogate(s, b):  # rounding offsets and the in-range decision frozen: the rest is smooth
        v = (w if b is None else w + b) / s
        values = s * (inside * (v + offset) + (1 - inside) * code) - (0 if b is None else b)
        return (F.linear(x, values.reshape(12, 64)) * g).sum()

    eps = 1e-7
    for k in range(0, scale.shape[0], 5):
        e = torch.zeros_like(scale)
        e[k] = eps
        fd = (surrogate(scale + e, shift) - surrogate(scale - e, shift)) / (2 * eps)
        assert fd.item() == pytest.approx(grad_scale[k].item(), rel=1e-5, abs=1e-6)
        if shift is not None:
            fd = (surrogate(scale, shift + e) - surrogate(scale, shift - e)) / (2 * eps)
            assert fd.item() == pytest.approx(grad_shift[k].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("clip", [False, True], ids=["minmax", "clipped"])
def test_learned_scales_train_save_and_reload_exactly(no_compiled_kernels, tmp_path, clip):
    teacher = make_model()
    student = quantize_student(copy.deepcopy(teacher), "int2", group_size=16, calibration=[batch()], clip=clip,
                               learn_scales=True)
    start = {n: (m.weight_scale.detach().clone(), m.weight_shift.detach().clone())
             for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    assert all(student.get_submodule(n).learns_scales for n in start)
    trainer = train(student, teacher, tmp_path, ratio=0.5)
    groups = trainer.optimizer.param_groups
    scales = {id(m.weight_scale) for m in student.modules() if isinstance(m, FakeQuantLinear)}
    own = [g for g in groups if any(id(p) in scales for p in g["params"])]
    assert len(own) == 1 and all(id(p) not in scales for g in groups if g is not own[0] for p in g["params"])
    assert own[0]["weight_decay"] == 0.0 and len(own[0]["params"]) == 2 * len(start)
    assert own[0]["initial_lr"] == pytest.approx(0.5 * trainer.args.learning_rate)
    assert any(not torch.equal(student.get_submodule(n).weight_scale, s) for n, (s, _) in start.items())
    assert any(not torch.equal(student.get_submodule(n).weight_shift, b) for n, (_, b) in start.items())
    ids = torch.randint(3, 30, (3, 20))
    trained = logits_of(student, ids)
    save_quantized(student, tmp_path / "q")
    assert isinstance(student.model.layers[0].mlp.up_proj, QModuleMixin)
    assert (logits_of(load_quantized(tmp_path / "q"), ids) - trained).abs().max().item() == 0.0
    thawed = thaw_quantized(load_quantized(tmp_path / "q"), learn_scales=True)
    assert thawed.model.layers[0].mlp.up_proj.learns_scales
    assert torch.equal(logits_of(thawed, ids), trained)


def test_options_refuse_quantized_activations():
    with pytest.raises(ValueError, match="weight-only"):
        quantize_student(make_model(), "int8", activations="int8", calibration=[batch()], learn_scales=True)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_student(make_model(), "int4", clip=True)
    with pytest.raises(ValueError, match="weight-only"):
        get_degradation("quanto", weights="int8", activations="fp8", clip_search=True)
