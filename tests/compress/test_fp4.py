"""FP4 fake quantization (hf_sdft.compress.fp4) against an independent float64 enumeration of the
E2M1 grid and against compressed-tensors' own FP4 functions."""

import itertools

import pytest
import torch
from torch import nn

from hf_sdft.compress.fp4 import (
    FP4FakeQuantLinear,
    fp4_clip_search,
    fp4_fake_quantize,
    mxfp4_exponents,
    nvfp4_block_scales,
    nvfp4_global_scale,
    round_e2m1,
    share_global_scales,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def brute_e2m1(x: float) -> float:
    """Nearest signed E2M1 value by enumeration in float64; a tie goes to the value whose code
    (index in E2M1, 0..7) is even; beyond ±6 the nearest is ±6."""
    mags = E2M1
    a = abs(x)
    dist = [abs(a - m) for m in mags]
    best = min(dist)
    ties = [i for i, d in enumerate(dist) if d == best]
    i = next((i for i in ties if i % 2 == 0), ties[0])
    return (-1.0 if x < 0 else 1.0) * mags[i]


def test_round_e2m1_matches_enumeration():
    grid = torch.linspace(-8, 8, 6401, dtype=torch.float64)  # steps of 1/400: every midpoint and value hit
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    x = torch.cat([grid, mids, -mids, mids + 1e-9, mids - 1e-9, torch.randn(2000, dtype=torch.float64) * 3])
    x = x.float().double()  # the float32 inputs the layer sees (mids ± 1e-9 round onto the mids)
    ours = round_e2m1(x.float().clamp(-6, 6)).double()
    ref = torch.tensor([brute_e2m1(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(ours, ref)
    # the ties went to even codes: 2.5 -> 2, 5 -> 4, 0.25 -> 0, 0.75 -> 1, 1.75 -> 2
    assert round_e2m1(torch.tensor([2.5, 5.0, 0.25, 0.75, 1.75, 3.5, 1.25])).tolist() == [2, 4, 0, 1, 2, 4, 1]


def brute_fp4_weight(w: torch.Tensor, block: int, steps: torch.Tensor) -> torch.Tensor:
    """float64 reference: per block the nearest value of ``{±e2m1 * step}`` by enumeration."""
    out = torch.empty_like(w, dtype=torch.float64)
    flat, outflat = w.double().reshape(-1, block), out.view(-1, block)
    for r in range(flat.shape[0]):
        step = float(steps[r])
        for c in range(block):
            outflat[r, c] = brute_e2m1(float(flat[r, c]) / step) * step
    return out


@pytest.mark.parametrize("fmt,mode", [("nvfp4", "pow2"), ("nvfp4", "minmax"), ("mxfp4", "ocp"),
                                      ("mxfp4", "compressed-tensors")])
def test_weight_grid_matches_enumeration(fmt, mode):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.logspace(-3, 0, 8)[:, None]
    if fmt == "nvfp4":
        g = nvfp4_global_scale(w, mode)
        steps = nvfp4_block_scales(w, g).double() / g.double()
        got = fp4_fake_quantize(w, fmt, g)
        block = 16
    else:
        steps = torch.exp2(mxfp4_exponents(w, mode)).double()
        got = fp4_fake_quantize(w, fmt, mx_rule=mode)
        block = 32
    ref = brute_fp4_weight(w, block, steps.flatten())
    if fmt == "nvfp4" and mode == "minmax":  # s / g rounds to float32 before the product
        ref = brute_fp4_weight(w, block, (nvfp4_block_scales(w, g) / g).double().flatten())
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=0)
    else:
        assert torch.equal(got.double(), ref)
    # at most 8 distinct magnitudes in every block (16 for NVFP4, 32 for MXFP4)
    mags = got.abs().reshape(-1, block)
    assert max(len(torch.unique(row)) for row in mags) <= 8


def test_scales_by_hand():
    w = torch.zeros(2, 32)
    w[0, 0], w[0, 16], w[1, 5] = 3.0, 0.7, -1.76
    g = nvfp4_global_scale(w, "minmax")
    assert g.item() == pytest.approx(2688 / 3.0)
    assert nvfp4_global_scale(w, "pow2").item() == 512.0  # 2688 / 3 = 896 -> 512
    # MXFP4: amax 3.0 -> k = 1 - 2 = -1 both rules; amax 1.76 (mantissa 1.76 >= 1.75) -> CT rounds up
    ks_ocp = mxfp4_exponents(w, "ocp").flatten().tolist()
    ks_ct = mxfp4_exponents(w, "compressed-tensors").flatten().tolist()
    assert ks_ocp == [-1.0, -2.0] and ks_ct == [-1.0, -1.0]
    assert mxfp4_exponents(torch.zeros(1, 32)).item() == -127  # an all-zero block: E8M0 byte 0


ct = pytest.importorskip("compressed_tensors")


def _ct_args(fmt):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("NVFP4A16" if fmt == "nvfp4" else "MXFP4A16", ["Linear"]).weights


@pytest.mark.parametrize("mode", ["minmax", "pow2"])
def test_nvfp4_matches_compressed_tensors(mode):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = _ct_args("nvfp4")
    torch.manual_seed(1)
    w = torch.randn(16, 128) * 0.05
    w[3, :16] *= 1e-4  # a tiny block: its scale lands in E4M3's subnormals
    w[5, 16:32] = 0  # an all-zero block: scale 0 -> 0.125
    g_ct = generate_gparam(w.min(), w.max())
    g = nvfp4_global_scale(w, mode)
    if mode == "minmax":
        assert torch.equal(g, g_ct)
    grouped = w.reshape(16, -1, 16)
    s_ct, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=g)
    s = nvfp4_block_scales(w, g)
    assert torch.equal(s.reshape(16, -1), s_ct)
    ref = fake_quantize(w, s_ct, zp, args, global_scale=g)
    assert torch.equal(fp4_fake_quantize(w, "nvfp4", g), ref)


@pytest.mark.parametrize("rule", ["compressed-tensors", "ocp"])
def test_mxfp4_matches_compressed_tensors_and_gguf(rule):
    import gguf
    import numpy as np
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _ct_args("mxfp4")
    torch.manual_seed(2)
    w = torch.randn(8, 128) * torch.logspace(-2, 0, 8)[:, None]
    w[0, :32] = 0
    w[1, 0] = 1.75 * w[1, :32].abs().max()  # a block max with mantissa exactly 1.75
    grouped = w.reshape(8, -1, 32)
    ours = fp4_fake_quantize(w, "mxfp4", mx_rule=rule)
    if rule == "compressed-tensors":
        s_ct, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        assert torch.equal(torch.exp2(mxfp4_exponents(w, rule)).reshape(8, -1), s_ct)
        assert torch.equal(ours, fake_quantize(w, s_ct, zp, args))
    else:  # gguf-py's MXFP4 quantizer picks the OCP exponent; its values equal ours
        blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)
        back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(back.reshape(8, 128), ours.numpy())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_layer_straight_through_and_blocks(fmt):
    torch.manual_seed(3)
    linear = nn.Linear(64, 8)
    layer = FP4FakeQuantLinear.from_linear(linear, fmt)
    assert layer.weight is linear.weight and isinstance(layer, nn.Linear)
    x = torch.randn(5, 64)
    layer(x).sum().backward()
    # straight through: the gradient is that of a plain linear layer with the quantized weight
    q = layer.quantized_weight()
    expected = torch.ones(5, 8).T @ x
    assert torch.allclose(linear.weight.grad, expected)
    block = 16 if fmt == "nvfp4" else 32
    assert max(len(torch.unique(r)) for r in q.abs().reshape(-1, 16)) <= 8
    assert max(len(torch.unique(r)) for r in q.abs().reshape(-1, block)) <= 8
    elements, scale, g = layer.quantized()
    step = scale.repeat_interleave(block, 1) / (g if g is not None else 1)
    assert torch.equal(elements * step, q)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_held_and_learned_scales(fmt):
    torch.manual_seed(4)
    layer = FP4FakeQuantLinear.from_linear(nn.Linear(64, 8), fmt)
    before = layer.quantized_weight()
    layer.hold_scales(learnable=True)
    assert torch.equal(layer.quantized_weight(), before)  # holding the current scales changes nothing
    x = torch.randn(4, 64)
    layer(x).pow(2).sum().backward()
    assert layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight_scale.mul_(1.01)  # off the grid: the layer computes with it rounded back to the grid
    s = layer.block_scales()
    if fmt == "nvfp4":
        assert torch.equal(s.to(torch.float8_e4m3fn).float(), s)
    else:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_clip_search_never_worse(fmt):
    torch.manual_seed(5)
    layer = FP4FakeQuantLinear.from_linear(nn.Linear(64, 16), fmt)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    plain = ((x @ (layer.weight - layer.quantized_weight()).T) ** 2).sum()
    layer.hold_scales(fp4_clip_search(layer, x))
    clipped = ((x @ (layer.weight - layer.quantized_weight()).T) ** 2).sum()
    assert clipped <= plain


def test_fused_global_scales_and_errors():
    layers = {f"m.{n}": FP4FakeQuantLinear.from_linear(nn.Linear(32, 8), "nvfp4") for n in ("q_proj", "k_proj")}
    with torch.no_grad():
        layers["m.k_proj"].weight.mul_(10)
    layers["m.k_proj"].weight_global_scale = nvfp4_global_scale(layers["m.k_proj"].weight)
    share_global_scales(layers)
    assert torch.equal(layers["m.q_proj"].weight_global_scale, layers["m.k_proj"].weight_global_scale)
    with pytest.raises(ValueError, match="multiples of 32"):
        FP4FakeQuantLinear.from_linear(nn.Linear(48, 8), "mxfp4", name="x.proj")
    with pytest.raises(ValueError, match="fp4_global_scale"):
        nvfp4_global_scale(torch.ones(2, 16), "bogus")
    with pytest.raises(ValueError, match="W4A4"):
        FP4FakeQuantLinear(32, 8, fmt="mxfp4", quantize_activations=True)


def test_activation_fake_quant_is_optional():
    torch.manual_seed(6)
    lin = nn.Linear(32, 4)
    w4a16 = FP4FakeQuantLinear.from_linear(lin, "nvfp4")
    w4a4 = FP4FakeQuantLinear.from_linear(lin, "nvfp4", quantize_activations=True)
    x = torch.randn(3, 32)
    assert torch.allclose(w4a16(x), x @ w4a16.quantized_weight().T + lin.bias)
    assert not torch.allclose(w4a4(x), w4a16(x))
    for a, b in itertools.pairwise([w4a16, w4a4]):
        assert a.weight is b.weight
