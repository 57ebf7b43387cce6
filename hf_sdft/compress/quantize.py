"""Quantized students. Every optimum-quanto call of the project lives here (quanto is in
maintenance mode upstream: one small module to replace if it goes); quanto's format is the saved
one (``model.safetensors`` with its integer weights, ``quanto_qmap.json``, the group sizes).

Training never runs a compiled quanto kernel nor builds one (quanto JIT-compiles its C++/CUDA
extension, minutes with nvcc, at the first unpacking of int4/int2 weights):

- :func:`quantize_student` and :func:`thaw_quantized` give the student
  :class:`~hf_sdft.compress.fake_quant.FakeQuantLinear` layers: plain-PyTorch straight-through fake
  quantization on quanto's grid, so the checkpoint :func:`save_quantized` writes computes exactly
  what was trained. The one exception is activation quantization (int8 / fp8 activations, a rare
  option): those layers stay quanto's own ``QLinear``, which re-quantizes at every forward.
- Frozen layers (:func:`to_quanto`, the memory-light LoRA base, and models from
  :func:`load_quantized`) are quanto's, with its pure-PyTorch ``quanto::unpack`` registered over
  the compiled CPU/CUDA ones (:func:`use_pure_kernels`). Caveat: quanto picks its AWQ (compiled)
  layout for float16 int4 weights in groups of 128 on CUDA; hf-sdft's students are float32.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from optimum.quanto import Calibration, QModuleMixin, freeze, qfloat8, qint2, qint4, qint8, quantization_map, quantize
from optimum.quanto.nn import QLinear
from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor
from safetensors.torch import load_file, save_file
from torch import nn

from hf_sdft.compress.base import Degradation
from hf_sdft.compress.calibration import layer_tokens, run_calibration
from hf_sdft.compress.fake_quant import (
    CLIP_RATIOS,
    CLIP_TOKENS,
    SCALES_LR_RATIO,
    FakeQuantLinear,
    clip_search,
    code_offset,
    on_fp16_grid,
    scale_group,
    split_scale_parameters,
    stored_symmetric,
)
from hf_sdft.modeling import check_safetensors

BITS_QTYPES = {8: qint8, 4: qint4, 2: qint2}  # the one bits ↔ quanto weight type table; the two below derive from it
WEIGHT_TYPES = {f"int{bits}": qtype for bits, qtype in BITS_QTYPES.items()}
ACTIVATION_TYPES = {"int8": qint8, "fp8": qfloat8}
QMAP_FILE = "quanto_qmap.json"
GROUPS_FILE = "quanto_group_sizes.json"
WEIGHTS_FILE = "model.safetensors"
QTYPE_BITS = {qtype.name: bits for bits, qtype in BITS_QTYPES.items()}
SCHEMES = ("asymmetric", "symmetric")  # int4 / int2 grids (see hf_sdft.compress.fake_quant)


def _check_types(weights: str, activations: str | None) -> None:
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"unsupported weight bit width {weights!r}: quanto supports {', '.join(WEIGHT_TYPES)}")
    if activations is not None and activations not in ACTIVATION_TYPES:
        raise ValueError(
            f"unsupported activation type {activations!r}: choose one of {', '.join(ACTIVATION_TYPES)} or None"
        )


_pure_unpack_installed = False


def _pure_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's int4 / int2 unpacking in plain PyTorch (what its "default" kernel computes): the
    ``8 // bits`` values of each byte, lowest bits first, stacked along the first dimension."""
    mask = 2**bits - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def use_pure_kernels() -> None:
    """Route ``quanto::unpack`` on CPU and CUDA to quanto's pure-PyTorch kernel instead of its
    compiled extensions (which would be JIT-built). Idempotent.

    Two ways, as torch versions differ: the kernel is registered over quanto's own for the CPU and
    CUDA keys (torch 2.13 allows that; 2.11 refuses to override a Python registration), and each
    extension's library is preset to the pure function, so that quanto's compiled-kernel wrappers,
    where they still run, call it instead of loading (building) the extension."""
    global _pure_unpack_installed, _override_lib
    if _pure_unpack_installed:
        return
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    try:
        _override_lib = torch.library.Library("quanto", "IMPL")  # kept alive: its kernels live as long as it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for key in ("CPU", "CUDA"):
                _override_lib.impl("unpack", _pure_unpack, key)
    except RuntimeError:
        pass
    for name in ("quanto_cpp", "quanto_cuda"):
        if is_extension_available(name) and get_extension(name)._lib is None:
            get_extension(name)._lib = SimpleNamespace(unpack=_pure_unpack)
    _pure_unpack_installed = True


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers: :class:`FakeQuantLinear` (training) and quanto's (frozen, or with quantized activations)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (FakeQuantLinear, QModuleMixin))}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def calibration_inputs(model: nn.Module, layers: dict[str, nn.Module], calibration: list[dict],
                       max_tokens: int = CLIP_TOKENS, seed: int = 0) -> dict[str, torch.Tensor]:
    """The inputs ``(tokens, in)`` of each of ``layers`` over the calibration batches (one forward
    of ``model``, padding excluded), at most ``max_tokens`` of them, drawn at random evenly across
    the batches (the same tokens for every layer), in float32 on the layer's device."""
    per_batch = -(-max_tokens // len(calibration))
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    state: dict = {}  # per batch: its padding mask and the tokens drawn from it

    def capture(name: str, module: nn.Module, args: tuple) -> None:
        x = layer_tokens(args[0], state)
        if state.get("pick") is None or state["pick"][0] != x.shape[0]:
            g = torch.Generator().manual_seed(seed + len(kept[name]))
            state["pick"] = (x.shape[0], torch.randperm(x.shape[0], generator=g)[:per_batch].sort().values)
        kept[name].append(x[state["pick"][1].to(x.device)].float())

    run_calibration(model, calibration, state, [(m, partial(capture, name)) for name, m in layers.items()])
    return {name: torch.cat(xs)[:max_tokens] for name, xs in kept.items()}


def quantize_student(
    model: nn.Module,
    weights: str = "int4",
    activations: str | None = None,
    exclude: tuple[str, ...] = ("lm_head",),
    group_size: int | None | str = "auto",
    calibration: list[dict] | None = None,
    clip: bool = False,
    learn_scales: bool = False,
    symmetric: bool = False,
    fp16_scales: bool = False,
) -> nn.Module:
    """Quantize ``model``'s linear layers in place for quantization-aware training: each becomes a
    :class:`FakeQuantLinear` holding the same float parameters (quanto ``QLinear`` layers when
    ``activations`` is set).

    Args:
        weights: ``int8`` | ``int4`` | ``int2``.
        activations: ``None`` | ``int8`` | ``fp8``; needs ``calibration`` batches.
        exclude: fnmatch patterns of module names kept in float.
        group_size: int4/int2 only. ``"auto"`` keeps quanto's choice (128, or one scale per
            output channel when the input dim is ≤ 128); ``None`` forces one scale per output
            channel; an int sets the group size (it must divide the input dim).
        clip: search each group's clipping range on the ``calibration`` batches' inputs
            (:func:`~hf_sdft.compress.fake_quant.clip_search`, its cost per layer there; the
            inputs of every layer, at most 512 tokens each, are held in float32 during the search);
            the layers hold that grid.
        learn_scales: the layers' scales and shifts become parameters trained with the loss
            (from the clipped grid with ``clip``, else quanto's min/max one).
        symmetric: int4 / int2 on the symmetric grid (``scale * q``, no zero point: what
            compressed-tensors and GGUF's Q4_0 store) instead of quanto's asymmetric one.
        fp16_scales: scales and shifts kept on float16 values (what GGUF stores), so that export
            is exact.
    """
    _check_types(weights, activations)
    if (clip or learn_scales or symmetric or fp16_scales) and activations is not None:
        raise ValueError("clip search, learned scales and the deployment grids (symmetric, fp16 scales) apply to "
                         "weight-only quantization (activations None)")
    if clip and not calibration:
        raise ValueError("the clip search needs calibration batches (the layers' inputs)")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    if activations is not None and not calibration:
        raise ValueError("activation quantization needs calibration batches to set the activation scales")
    bits = QTYPE_BITS[WEIGHT_TYPES[weights].name]
    chosen = {name: m for name, m in model.named_modules()
              if type(m) is nn.Linear and not any(fnmatch(name, pattern) for pattern in exclude)}
    if not chosen:
        raise ValueError(f"no linear layer left to quantize after exclude={list(exclude)}")
    sizes = {}
    for name, m in chosen.items():
        size = group_size if bits != 8 else None
        if size is not None and size != "auto" and m.in_features % size:
            raise ValueError(f"group_size={size} does not divide {name}'s input dim {m.in_features}")
        sizes[name] = FakeQuantLinear.from_linear(m, bits, size, name, symmetric=symmetric, fp16_scales=fp16_scales)
    inputs = calibration_inputs(model, chosen, calibration) if clip else {}
    if activations is None:
        for name, layer in sizes.items():
            if clip:
                scale, shift, ratio = clip_search(layer.weight, layer.bits, layer.group_size, inputs.pop(name),
                                                  symmetric=symmetric, fp16_scales=fp16_scales)
                layer.hold_scales(scale, shift, learnable=learn_scales)
                layer.clip_ratio = ratio  # for the degradation's description
            elif learn_scales:
                layer.hold_scales(learnable=True)
            _set_module(model, name, layer)
        return model
    use_pure_kernels()
    quantize(model, weights=WEIGHT_TYPES[weights], activations=ACTIVATION_TYPES[activations],
             include=list(chosen))
    for name, layer in sizes.items():
        model.get_submodule(name).weight_group_size = layer.group_size
    with torch.no_grad(), Calibration(streamline=False):  # streamlining is not recorded in the quantization map
        for batch in calibration:
            model(**batch)
    return model


def _group_size(module: nn.Module) -> int | None:
    return module.group_size if isinstance(module, FakeQuantLinear) else module.weight_group_size


def _group_sizes(model: nn.Module) -> dict[str, int | None]:
    return {name: _group_size(m) for name, m in quantized_modules(model).items()}


def _frozen_quanto(layer: FakeQuantLinear) -> QLinear:
    """A frozen quanto ``QLinear`` holding ``layer``'s integer weights (the same values) and bias."""
    qtype = BITS_QTYPES[layer.bits]
    weight = layer.weight
    frozen = QLinear.qcreate(layer, qtype, device="meta").to_empty(device=weight.device)
    frozen.input_scale = torch.ones((), dtype=weight.dtype, device=weight.device)
    frozen.output_scale = torch.ones((), dtype=weight.dtype, device=weight.device)
    frozen.weight_group_size = layer.group_size
    codes, scale, shift = layer.quantized()
    scale, shift = scale.detach(), None if shift is None else shift.detach()
    if layer.bits < 8 and shift is None:  # symmetric: quanto's unsigned codes, the same values (exact on fp16 scales)
        codes, shift = codes + code_offset(layer.bits), code_offset(layer.bits) * scale
    if layer.bits == 8:
        qweight = WeightQBytesTensor(qtype, 0, weight.size(), weight.stride(), codes.to(torch.int8), scale, None)
    else:
        qweight = WeightQBitsTensor(qtype, 0, layer.group_size, weight.size(), weight.stride(),
                                    codes.to(torch.uint8), scale, shift)
    frozen.weight = nn.Parameter(qweight, requires_grad=False)
    frozen.bias = layer.bias
    return frozen


def to_quanto(model: nn.Module) -> nn.Module:
    """Freeze every quantized layer in place to quanto's integer weights (the values it computes
    with now): :class:`FakeQuantLinear` becomes a frozen quanto ``QLinear``."""
    use_pure_kernels()
    for name, m in list(quantized_modules(model).items()):
        if isinstance(m, FakeQuantLinear):
            _set_module(model, name, _frozen_quanto(m))
    freeze(model)
    return model


def save_quantized(model: nn.Module, output_dir: str | Path) -> None:
    """Freeze ``model`` in place to quanto's integer weights (:func:`to_quanto`) and write config,
    safetensors, the quantization map and the group sizes."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    to_quanto(model.cpu())  # quanto's packing on the CPU: on CUDA it may reach for its compiled extension
    seen: dict[int, str] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        state[key] = tensor.clone() if ptr in seen else tensor.contiguous()  # tied weights: safetensors needs copies
        seen.setdefault(ptr, key)
    save_file(state, str(output_dir / WEIGHTS_FILE), metadata={"format": "pt", "quantizer": "optimum-quanto"})
    (output_dir / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=2))
    (output_dir / GROUPS_FILE).write_text(json.dumps(_group_sizes(model), indent=2))
    model.config.save_pretrained(output_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(output_dir)
    model.to(device)


def load_quantized(path: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (same logits) from a folder or Hub id.

    Its quantized layers are quanto's, frozen, running pure-PyTorch kernels only. The model is built
    on CPU from its config, not on the meta device: meta builds leave rotary buffers uninitialised.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    path = Path(path) / (subfolder or "")
    missing = [f for f in (WEIGHTS_FILE, QMAP_FILE, "config.json") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a quanto checkpoint saved by save_quantized: missing {missing}")
    check_safetensors(path)
    use_pure_kernels()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    qmap = json.loads((path / QMAP_FILE).read_text())
    groups = json.loads((path / GROUPS_FILE).read_text()) if (path / GROUPS_FILE).exists() else {}
    for name, q in qmap.items():
        weights = None if q["weights"] == "none" else q["weights"]
        activations = None if q["activations"] == "none" else q["activations"]
        quantize(model, weights=weights, activations=activations, include=[name])
        if name in groups:
            model.get_submodule(name).weight_group_size = groups[name]
    result = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match {type(model).__name__} built from its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval()


def thaw_quantized(model: nn.Module, hold_scales: bool = False, learn_scales: bool = False) -> nn.Module:
    """Turn frozen integer weights (e.g. from :func:`load_quantized`) back into trainable float
    weights holding their dequantized values, in :class:`FakeQuantLinear` layers that fake-quantize
    them again at every forward (quanto layers with quantized activations keep quanto's own
    re-quantization). By default the thawed layers recompute quanto's min/max grid from their
    weights: quantization-aware training starts from the frozen model's grid up to float rounding
    of the recomputed scales (not where the saved grid was clipped or learned). ``hold_scales``
    keeps the saved scales and shifts instead (the thawed model computes the saved one's values);
    ``learn_scales`` keeps them as parameters trained with the loss. A saved symmetric grid
    (``shift = 2^(bits-1) * scale``) thaws symmetric, and float16 scales stay float16."""
    use_pure_kernels()
    for name, m in list(quantized_modules(model).items()):
        if isinstance(m, FakeQuantLinear) or m.weight_qtype is None:
            continue
        if m.activation_qtype is not None:
            if m.frozen:
                m.weight = nn.Parameter(m.weight.dequantize().contiguous())
            continue
        weight = m.weight.dequantize() if m.frozen else m.weight.detach()
        bits = QTYPE_BITS[m.weight_qtype.name]
        scale = shift = None
        if m.frozen:
            scale = m.weight._scale.reshape(-1, 1)
            shift = getattr(m.weight, "_shift", None)
            shift = None if shift is None else shift.reshape(-1, 1)
        symmetric = scale is not None and stored_symmetric(bits, scale, shift)
        layer = FakeQuantLinear.from_linear(m, bits, m.weight_group_size, name, symmetric=symmetric,
                                            fp16_scales=scale is not None and on_fp16_grid(scale, shift))
        layer.weight = nn.Parameter(weight.contiguous())
        if hold_scales or learn_scales:
            if m.frozen:
                layer.hold_scales(scale, None if symmetric else shift, learnable=learn_scales)
            else:
                layer.hold_scales(learnable=learn_scales)
        _set_module(model, name, layer)
    return model


def computed_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight a quantized layer computes with (its quantized weight, dequantized), or
    ``None`` for a layer that is not quantized. Raises for quantized activations, which no float
    weight reproduces."""
    if isinstance(module, FakeQuantLinear) or hasattr(module, "fmt") and hasattr(module, "quantized_weight"):
        return module.quantized_weight()  # an integer grid or FP4FakeQuantLinear
    if not isinstance(module, QModuleMixin) or module.weight_qtype is None:
        return None
    if module.activation_qtype is not None:
        raise ValueError("this layer quantizes its activations, which no float weight reproduces: sample with "
                         "model.generate (use_vllm false) or quantize the weights only")
    use_pure_kernels()
    return module.qweight.dequantize()


def quantization_summary(model: nn.Module) -> dict:
    """``{"weights": ["int4"], "activations": [...], "layers": n}`` of a model's quantized layers
    (``{}`` when it has none)."""
    modules = quantized_modules(model)
    if not modules:
        from hf_sdft.compress.fp4_student import fp4_summary  # lazy: fp4_student imports this module

        return fp4_summary(model)  # {} without FP4 layers either
    names = {qtype.name: key for key, qtype in {**WEIGHT_TYPES, **ACTIVATION_TYPES}.items()}
    weights, acts = set(), set()
    for m in modules.values():
        if isinstance(m, FakeQuantLinear):
            weights.add(f"int{m.bits}")
            continue
        if m.weight_qtype is not None:
            weights.add(names.get(m.weight_qtype.name, m.weight_qtype.name))
        if m.activation_qtype is not None:
            acts.add(names.get(m.activation_qtype.name, m.activation_qtype.name))
    return {"weights": sorted(weights), "activations": sorted(acts), "layers": len(modules)}


@dataclass
class QuantoOptions:
    """The options of :class:`QuantoDegradation` (see :func:`quantize_student`). ``group_size``:
    an int, ``"auto"``, or None (one scale per output row); the strings ``"channel"`` (None) and
    ``"32"`` (32) are read as the CLI gives them."""

    weights: str = "int4"
    activations: str | None = None
    group_size: int | str | None = "auto"
    exclude: tuple[str, ...] = ("lm_head",)
    clip_search: bool = False
    learn_scales: bool = False
    scheme: str = "asymmetric"
    fp16_scales: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quant_scheme={self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.group_size == "channel":
            self.group_size = None
        elif isinstance(self.group_size, str) and self.group_size != "auto":
            if not self.group_size.strip().isdigit():
                raise ValueError(f"group_size={self.group_size!r}: give a positive integer, 'auto' or 'channel'")
            self.group_size = int(self.group_size)
        if isinstance(self.group_size, int) and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}: give a positive integer, 'auto' or 'channel'")
        self.exclude = tuple(self.exclude)
        _check_types(self.weights, self.activations)
        if (self.clip_search or self.learn_scales) and self.activations is not None:
            raise ValueError("clip search and learned scales apply to weight-only quantization (activations None)")


class QuantoDegradation(Degradation):
    """Weight (and optionally activation) quantization with optimum-quanto."""

    kind = "quanto"
    Options = QuantoOptions
    is_quantized = True

    def __init__(self, options: QuantoOptions | None = None, **fields):
        super().__init__(options, **fields)
        o = self.options
        self.weights, self.activations = o.weights, o.activations
        self.group_size, self.exclude = o.group_size, o.exclude
        self.clip_search, self.learn_scales = o.clip_search, o.learn_scales
        self.scheme, self.fp16_scales = o.scheme, o.fp16_scales and o.activations is None
        self.effective_group_sizes: dict[str, int | None] = {}
        self.clipped: dict[str, float] = {}

    def param_groups(self, model: nn.Module, lr: float, ratio: float = SCALES_LR_RATIO) -> list[dict]:
        """The learned scales and shifts (``learn_scales``) in a group of their own (:func:`scale_group`)."""
        _, scales = split_scale_parameters(model.named_parameters())
        return [scale_group(scales, lr, ratio)] if scales else []

    def apply(self, model, calibration=None):
        quantize_student(model, self.weights, self.activations, self.exclude, self.group_size, calibration,
                         clip=self.clip_search, learn_scales=self.learn_scales,
                         symmetric=self.scheme == "symmetric", fp16_scales=self.fp16_scales)
        self.effective_group_sizes = _group_sizes(model)
        ratios = [m.clip_ratio for m in quantized_modules(model).values() if hasattr(m, "clip_ratio")]
        if ratios:
            ratios = torch.cat([r.flatten().float().cpu() for r in ratios])
            self.clipped = {"groups_clipped": round((ratios < 1).float().mean().item(), 4),
                            "mean_ratio": round(ratios.mean().item(), 4)}
        return model

    def describe(self) -> dict:
        sizes = sorted({str(g) if g is not None else "per-channel" for g in self.effective_group_sizes.values()})
        described = {
            "kind": self.kind, "weights": self.weights, "activations": self.activations,
            "group_size": ", ".join(sizes) if sizes else str(self.group_size),
            "quantized_layers": len(self.effective_group_sizes), "exclude": list(self.exclude),
            "scheme": "symmetric" if self.weights == "int8" else self.scheme, "fp16_scales": self.fp16_scales,
        }
        if self.clip_search:
            described["clip_search"] = (f"per-group min/max shrink over {CLIP_RATIOS[0]}..{CLIP_RATIOS[-1]} "
                                        f"({len(CLIP_RATIOS)} ratios), least output error on calibration inputs")
            if self.clipped:
                described["clip_groups_shrunk"] = self.clipped["groups_clipped"]
                described["clip_mean_ratio"] = self.clipped["mean_ratio"]
        if self.learn_scales:
            described["learned_scales"] = True
        return described

    def tags(self) -> list[str]:
        return ["quanto", self.weights] + ([f"a{self.activations}"] if self.activations else [])
