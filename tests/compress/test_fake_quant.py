"""Our fake quantization against optimum-quanto: the same grid value for value, a straight-through
gradient, and students that train, save and reload with no compiled quanto kernel nor JIT build;
quanto-format checkpoints written by quanto itself still load."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, freeze, qint2, qint4, qint8, quantization_map, quantize
from optimum.quanto.library.extensions import extension
from optimum.quanto.library.extensions.extension import Extension, get_extension, is_extension_available
from optimum.quanto.tensor.weights import quantize_weight as quanto_quantize_weight
from safetensors.torch import save_file

from hf_sdft.compress.fake_quant import FakeQuantLinear, default_group_size, fake_quantize
from hf_sdft.compress.quantize import (
    GROUPS_FILE,
    QMAP_FILE,
    WEIGHTS_FILE,
    load_quantized,
    quantize_student,
    save_quantized,
    thaw_quantized,
    use_pure_kernels,
)
from tests.helpers import make_model, make_texts, make_tokenizer
from tests.trainer.test_trainer import sdft_trainer

QTYPES = {8: qint8, 4: qint4, 2: qint2}
SECOND_MODEL = "tests/assets/second_model/model"


def quanto_values(w, bits, group_size):
    """quanto's dequantized weight, through its own optimizer and quantizer (no kernel selection)."""
    use_pure_kernels()
    qtype = QTYPES[bits]
    if bits == 8:
        scale, shift = AbsmaxOptimizer()(w, qtype, axis=0), None
    else:
        scale, shift = MaxOptimizer()(w, qtype, axis=0, group_size=group_size)
    return quanto_quantize_weight(w, qtype, 0, scale, shift, group_size=group_size, optimized=False).dequantize()


def weights(out, inp, seed, bits):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-4, 2, out)[:, None]  # rows of very different scale
    w[0] = 0.0  # a constant row: scale 0
    w[1, :32] = 0.25  # a constant group
    ties = [0.5, 2.5, -1.5, 127.0] if bits == 8 else [0.0, 0.5, 2.5, 2.0**bits - 1]  # scale 1: codes at x.5
    w[2] = torch.tensor(ties).repeat(inp // 4)  # round half to even, like quanto
    return w


CASES = [(8, None, (64, 256)), (8, None, (33, 96))] + [
    (bits, gs, shape) for bits in (4, 2) for shape in ((64, 256), (48, 384), (33, 96))
    for gs in (None, 32, 64, 128) if gs is None or shape[1] % gs == 0
]


@pytest.mark.parametrize("bits,group_size,shape", CASES)
def test_fake_quantize_is_quantos_grid_bit_for_bit(bits, group_size, shape):
    for seed in range(3):
        w = weights(*shape, seed, bits)
        mine, theirs = fake_quantize(w, bits, group_size), quanto_values(w, bits, group_size)
        assert torch.equal(mine, theirs), (mine - theirs).abs().max()
        assert mine.unique().numel() > 1


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layer_matches_quantos_own_qat_layer(bits):
    use_pure_kernels()
    linear = torch.nn.Linear(256, 48)
    ours = FakeQuantLinear.from_linear(copy.deepcopy(linear), bits)
    theirs = torch.nn.Sequential(copy.deepcopy(linear))
    quantize(theirs, weights=QTYPES[bits])
    assert ours.group_size == theirs[0].weight_group_size  # quanto's automatic choice
    assert torch.equal(ours.quantized_weight(), theirs[0].qweight.dequantize())


def test_default_group_size_is_quantos():
    for in_features in (16, 128, 160, 192, 200, 256, 352, 448, 1000, 11008):
        quanto_layer = torch.nn.Sequential(torch.nn.Linear(in_features, 2, device="meta"))
        quantize(quanto_layer, weights=qint4)
        assert default_group_size(in_features, 4) == quanto_layer[0].weight_group_size, in_features
    assert default_group_size(4096, 8) is None


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, None)])
def test_gradient_is_straight_through(bits, group_size):
    torch.manual_seed(0)
    layer = FakeQuantLinear(64, 16, bias=True, bits=bits, group_size=group_size)
    x, g = torch.randn(5, 7, 64), torch.randn(5, 7, 16)
    (layer(x) * g).sum().backward()
    grid = fake_quantize(layer.weight.detach(), bits, group_size).requires_grad_(True)
    (F.linear(x, grid, layer.bias.detach()) * g).sum().backward()
    assert torch.equal(layer.weight.grad, grid.grad)  # d loss / d float weight == d loss / d grid weight
    assert torch.equal(layer.weight.grad, torch.einsum("bto,bti->oi", g, x))


def test_autocast_and_errors():
    layer = FakeQuantLinear(64, 16, bits=4, group_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 64)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="group_size=24 does not divide layer's input dim 64"):
        FakeQuantLinear(64, 16, bits=4, group_size=24)
    with pytest.raises(ValueError, match="int8 has one scale per output row"):
        FakeQuantLinear(64, 16, bits=8, group_size=32)
    with pytest.raises(ValueError, match="bits=3"):
        FakeQuantLinear(64, 16, bits=3)


@pytest.mark.parametrize("bits", [4, 2])
def test_pure_unpack_is_quantos_default_kernel(bits):
    from hf_sdft.compress.quantize import _pure_unpack

    packed = torch.randint(0, 256, (7, 5), dtype=torch.uint8)
    default = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)  # quanto's pure kernel
    assert torch.equal(_pure_unpack(packed, bits), torch.ops.quanto.unpack.default.redispatch(default, packed, bits))


@pytest.fixture
def no_compiled_kernels(monkeypatch):
    """Any JIT build or compiled quanto extension raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a quanto extension was built or loaded")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", refuse)
    monkeypatch.setattr(extension, "load", refuse)
    monkeypatch.setattr(Extension, "lib", property(lambda ext: ext._lib if ext._lib is not None else refuse()))
    with pytest.raises(AssertionError, match="was built or loaded"):
        extension.load(name="quanto_cpp", sources=[])
    from hf_sdft.compress.quantize import _pure_unpack, use_pure_kernels

    use_pure_kernels()  # what the project's quanto entry points call: no compiled library may be loaded
    for name in ("quanto_cpp", "quanto_cuda"):
        if is_extension_available(name):
            assert get_extension(name)._lib.unpack is _pure_unpack, f"{name} holds a compiled library"


def train(student, teacher, tmp_path, steps=3):
    tok = make_tokenizer()
    trainer = sdft_trainer(tmp_path / "run", student, teacher, tok, make_texts(24), max_steps=steps,
                           learning_rate=1e-2, save_strategy="no")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters() if "proj" in n)
    return tok


def second_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SECOND_MODEL, dtype=torch.float32)


@pytest.mark.parametrize("bits,group_size", [("int2", 16), ("int4", "auto")])
@pytest.mark.parametrize("make", [make_model, second_model], ids=["tiny", "second"])
def test_student_trains_saves_and_reloads_without_compiled_kernels(no_compiled_kernels, tmp_path, bits, group_size,
                                                                   make):
    teacher = make()
    student = quantize_student(copy.deepcopy(teacher), bits, group_size=group_size)
    train(student, teacher, tmp_path)
    ids = torch.randint(3, 30, (3, 20))
    student.eval()
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    save_quantized(student, tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / QMAP_FILE).read_text())
    assert qmap and all(v == {"weights": f"q{bits}", "activations": "none"} for v in qmap.values())
    reloaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - trained).abs().max().item() == 0.0
    thawed = thaw_quantized(load_quantized(tmp_path / "q"))  # an own student's QAT restarts from there
    assert isinstance(thawed.model.layers[0].mlp.up_proj, FakeQuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(thawed(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def save_with_quanto(model, folder):
    """A checkpoint as the pre-fake-quantization save_quantized wrote it, with quanto's own calls."""
    folder.mkdir()
    seen, state = set(), {}
    for key, tensor in model.state_dict().items():
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "quantizer": "optimum-quanto"})
    (folder / QMAP_FILE).write_text(json.dumps(quantization_map(model)))
    model.config.save_pretrained(folder)


@pytest.mark.parametrize("weights,groups", [(qint4, None), (qint2, 16), (qint8, None)])
def test_quanto_written_checkpoints_still_load(no_compiled_kernels, tmp_path, weights, groups):
    model = make_model(hidden=64)
    quantize(model, weights=weights, exclude=["lm_head"])
    if groups is not None:
        for m in model.modules():
            if hasattr(m, "weight_group_size"):
                m.weight_group_size = groups
    freeze(model)
    save_with_quanto(model, tmp_path / "old")
    if groups is not None:
        sizes = {name: groups for name in quantization_map(model)}
        (tmp_path / "old" / GROUPS_FILE).write_text(json.dumps(sizes))
    ids = torch.randint(3, 30, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(load_quantized(tmp_path / "old")(input_ids=ids).logits, expected)


def test_pruned_then_quantized_student_keeps_its_zeros(tmp_path):
    from hf_sdft.compress.prune import SparsityCallback, prune

    teacher = make_model()
    student = copy.deepcopy(teacher)
    masks = prune(student, sparsity=0.5, pattern="2:4")
    quantize_student(student, "int4", group_size=16)
    trainer = sdft_trainer(tmp_path, student, teacher, make_tokenizer(), make_texts(24), [SparsityCallback(masks)],
                           max_steps=3, learning_rate=1e-2)
    trainer.train()
    modules = dict(student.named_modules())
    assert all(isinstance(modules[name], FakeQuantLinear) for name in masks)
    assert all((modules[name].weight[~mask] == 0).all() for name, mask in masks.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ["int4", "int2"])
def test_cuda_qat_step_save_and_reload_without_compiled_kernels(no_compiled_kernels, tmp_path, bits):
    """On a GPU: QAT steps, the frozen save and the reload on CUDA never build or load quanto's
    CUDA extension; the reloaded logits are the trained student's (bias-free layers: exact)."""
    teacher = make_model()
    student = quantize_student(copy.deepcopy(teacher), bits, group_size=16).cuda().train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = torch.randint(3, 30, (3, 20), device="cuda")
    for _ in range(2):
        student(input_ids=ids, labels=ids).loss.backward()
        opt.step(), opt.zero_grad()
    student.eval()
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    save_quantized(student, tmp_path / "q")
    with torch.no_grad():
        reloaded = load_quantized(tmp_path / "q", device="cuda")(input_ids=ids).logits
    assert (reloaded - trained).abs().max().item() == 0.0


REFUSED_OVERRIDE = """
import sys, torch
from optimum.quanto.library.extensions import extension
def refuse(*a, **k):
    raise RuntimeError("not allowed: torch 2.11 refuses to override a Python-registered kernel")
torch.library.Library.impl = refuse  # what an older torch does with our registration
extension.load = torch.utils.cpp_extension.load = lambda *a, **k: sys.exit("quanto's extension was built")
from hf_sdft.compress.quantize import load_quantized
model = load_quantized(sys.argv[1])
ids = torch.arange(3, 19)[None]
torch.save(model(input_ids=ids).logits.detach(), sys.argv[2])
"""


def test_old_torch_refusing_the_kernel_override_still_builds_nothing(tmp_path):
    """torch 2.11 (the H200 image) refuses our registration over quanto's: the preset library must then serve."""
    model = make_model(hidden=64)
    quantize(model, weights=qint4, exclude=["lm_head"])
    freeze(model)
    save_with_quanto(model, tmp_path / "old")
    proc = subprocess.run([sys.executable, "-c", REFUSED_OVERRIDE, str(tmp_path / "old"), str(tmp_path / "logits.pt")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(input_ids=torch.arange(3, 19)[None]).logits)
