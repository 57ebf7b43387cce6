"""Issue 27.2: the min/max grid's fake quantization as one fused op (``torch.compile``; Triton on
CUDA, C++ from inductor's CPU backend here, forced), the same values and gradients as the eager
ops bit for bit; the capability check and the trainer's ``quant_compile``."""

import copy
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.profiler import profile

import hf_sdft.compress.fake_quant as fq
from hf_sdft.compress.fake_quant import FakeQuantLinear, compiled_fake_quant_available, fake_quantize
from hf_sdft.compress.quantize import quantize_student, quantized_modules
from hf_sdft.trainer.config import SDFTConfig
from tests.compress.test_reuse_grid import accumulate_side_by_side
from tests.helpers import cpu_args, make_model, make_texts, make_tokenizer
from tests.trainer.test_trainer import sdft_trainer

DEVICES = ["cpu"] + (["cuda"] if compiled_fake_quant_available("cuda") else [])
GRIDS = [(8, None, True), (4, 32, False), (4, 32, True), (2, 32, False), (2, 32, True), (4, None, False)]
SHAPES = [(64, 256), (33, 96)]  # two small shapes: each grid compiles once per shape


def weights(out: int, inp: int, bits: int, device) -> torch.Tensor:
    """Rows of very different scale, a constant (all-zero) row, a constant group and code ties."""
    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-4, 2, out)[:, None]
    w[0] = 0.0  # scale 0: 0 / 0 codes
    w[1, :32] = 0.25  # a constant group
    ties = [0.5, 2.5, -1.5, 127.0] if bits == 8 else [0.0, 0.5, 2.5, 2.0**bits - 1]
    w[2] = torch.tensor(ties).repeat(inp // 4)  # scale 1: codes at x.5, rounded half to even
    return w.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fp16_scales", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", GRIDS)
def test_compiled_grid_is_bit_identical(bits, group_size, symmetric, fp16_scales, shape, device):
    w = weights(*shape, bits, device).requires_grad_()
    kw = dict(symmetric=symmetric, fp16_scales=fp16_scales)
    eager, compiled = fake_quantize(w, bits, group_size, **kw), fake_quantize(w, bits, group_size, **kw, compiled=True)
    assert torch.equal(compiled, eager)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    (g_eager,) = torch.autograd.grad(eager, w, grad)
    (g_compiled,) = torch.autograd.grad(compiled, w, grad)
    assert torch.equal(g_compiled, g_eager) and torch.equal(g_compiled, grad)  # straight through


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_grid_in_half_precision(dtype):
    w = weights(64, 256, 4, "cpu").to(dtype)
    for fp16_scales in (False, True):
        eager = fake_quantize(w, 4, 32, fp16_scales=fp16_scales)
        assert torch.equal(fake_quantize(w, 4, 32, fp16_scales=fp16_scales, compiled=True), eager)


def aten_ops(compiled: bool, w: torch.Tensor) -> tuple[list[str], list[str]]:
    """The ``aten::`` ops and the compiled-graph calls one forward records."""
    with profile() as prof:
        fake_quantize(w, 4, 32, compiled=compiled)
    names = [e.name for e in prof.events()]
    return [n for n in names if n.startswith("aten::")], [n for n in names if "CompiledFxGraph" in n]


ELEMENTWISE = {"aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::round", "aten::clamp",
               "aten::nan_to_num"}


def test_one_fused_kernel_instead_of_the_elementwise_ops():
    w = weights(64, 256, 4, "cpu")
    fake_quantize(w, 4, 32, compiled=True)  # compiled before the count
    eager_ops, eager_graphs = aten_ops(False, w)
    compiled_ops, graphs = aten_ops(True, w)
    assert len([n for n in eager_ops if n in ELEMENTWISE]) >= 10 and not eager_graphs, eager_ops
    assert compiled_ops == [] and len(graphs) == 1, (compiled_ops, graphs)  # one compiled graph, no aten op
    # and that graph is one kernel, the min/max reductions fused in (a shape not compiled yet)
    _, code = run_and_get_code(lambda: fake_quantize(torch.randn(16, 64), 4, 32, compiled=True))
    kernels = {name for src in code for name in re.findall(r"\bcpp_fused_\w+", src)}
    assert len(kernels) == 1, kernels  # e.g. cpp_fused_add_amax_amin_clamp_div_mul_nan_to_num_neg_round_sub_view_0


def test_a_compiled_layer_reusing_its_grid_trains_as_the_eager_one():
    torch.manual_seed(0)
    eager = FakeQuantLinear.from_linear(torch.nn.Linear(64, 16), 4, 32, fp16_scales=True)
    compiled = copy.deepcopy(eager)
    compiled.compile_grid = compiled.reuse_grid = True
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    optimizers = [torch.optim.AdamW([m.weight], lr=1e-2) for m in (eager, compiled)]
    for _ in range(2):  # two optimizer steps of two micro-batches
        accumulate_side_by_side(eager, compiled, x, 2)
        assert torch.equal(compiled.weight.grad, eager.weight.grad)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        fq.forget_grids(compiled)
    assert torch.equal(compiled.weight, eager.weight)


def test_a_held_grid_stays_eager():
    layer = FakeQuantLinear.from_linear(torch.nn.Linear(64, 16), 4, 32).hold_scales(learnable=True)
    layer.compile_grid = True
    eager = fake_quantize(layer.weight, 4, 32, layer.weight_scale, layer.weight_shift)
    assert torch.equal(layer.quantized_weight(), eager)
    layer(torch.randn(2, 64)).sum().backward()
    assert layer.weight_scale.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_capability_and_quant_compile_on_cpu(tmp_path):
    assert not compiled_fake_quant_available("cpu") and not compiled_fake_quant_available("cuda")
    with pytest.raises(ValueError, match="quant_compile=true"):
        SDFTConfig(output_dir=str(tmp_path), quant_compile="true", **cpu_args())
    with pytest.raises(ValueError, match="quant_compile='sometimes'"):
        SDFTConfig(output_dir=str(tmp_path), quant_compile="sometimes", **cpu_args())
    teacher = make_model(seed=0)
    student = quantize_student(copy.deepcopy(teacher), "int4", group_size=32)
    for module in quantized_modules(student).values():
        module.compile_grid = True  # auto must turn it off here
    trainer = sdft_trainer(tmp_path, student, teacher, make_tokenizer(), make_texts(8), max_steps=1)  # auto
    assert not any(m.compile_grid for m in quantized_modules(student).values())
    name, layer = next(iter(quantized_modules(student).items()))
    with pytest.raises(ValueError, match=f"quant_compile=true: {name} computes on cpu"):
        trainer._compiles_grid(name, layer, "true")  # a layer the config's check could not see
