"""GGUF, for llama.cpp and Ollama: one ``model.gguf`` with the tokenizer inside.

Quantized layers are written as raw GGML blocks of 32 inputs carrying the student's own scales,
never re-quantized (gguf's own Q4_0 quantizer picks ``d = absmax / -8``, another grid):

========================================  =======  ===========================================
student grid                              GGML     block value
========================================  =======  ===========================================
int4 / int2 symmetric, groups of 32·k     Q4_0     ``(nibble - 8) · d``, nibble = q + 8, d = scale
int4 / int2 asymmetric (quanto's grid)    Q4_1     ``nibble · d + m``, nibble = code, d = scale, m = -shift
int8 (symmetric), per channel or 32·k     Q8_0     ``q · d``
========================================  =======  ===========================================

A group of 64, 128 or a whole row repeats its scale over its blocks of 32. ``d`` and ``m`` are
float16 in GGUF: exact only for students trained with ``quant_fp16_scales`` (the default). int2 is
stored inside 4-bit blocks: exact, but no smaller than int4. Every other matrix is written in the
student's float dtype (F32 for hf-sdft's students), so that nothing is rounded; vectors (norms,
biases) always in F32, as llama.cpp's converter does: its CPU adds and multiplies them into float32
activations and has no F16 / BF16 operand there (the upcast is exact).

llama.cpp computes ``d · q (+ m)`` in float32 as the student does; its CPU matmuls quantize the
*activations* to 8 bits, so its perplexity matches the student's closely, not bit for bit.

Llama's q / k projections are stored with llama.cpp's row order (rotary halves interleaved per
head), as its own converter does; Qwen2 keeps transformers' order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hf_sdft.export import fp4_weights
from hf_sdft.export.output_folder import copy_tokenizer, kept
from hf_sdft.export.student_weights import Entry, GridWeight, StudentWeights

BLOCK = 32  # inputs per GGML block of Q4_0 / Q4_1 / Q8_0
ARCHITECTURES = ("llama", "qwen2")
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _gguf():
    import gguf  # the gguf package (gguf-py), a dependency of the export only

    return gguf


def ggml_type(entry: Entry) -> str:
    """The GGML type ``entry`` is written as (see the module's table)."""
    if entry.grid is None:
        return "F32" if len(entry.shape) == 1 else FLOAT_TYPES[entry.dtype]
    if fp4_weights.is_fp4(entry):
        return "MXFP4" if entry.grid.fmt == "mxfp4" else "NVFP4"
    if entry.grid.bits == 8:
        return "Q8_0"
    return "Q4_0" if entry.grid.symmetric else "Q4_1"


def refusal(weights: StudentWeights) -> str | None:
    """Why the student has no exact GGUF form (None when it has one); raises for an architecture
    this writer does not know, which no re-rounding fixes."""
    model_type = getattr(weights.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export knows the architectures {', '.join(ARCHITECTURES)}, not {model_type!r}: "
                         "export compressed-tensors or dense")
    for entry in weights.grids():
        grid, inp = entry.grid, entry.shape[1]
        if fp4_weights.is_fp4(entry):
            why = fp4_weights.gguf_refusal(entry)
            if why:
                return why
            continue
        if grid.group_size % BLOCK or inp % BLOCK:
            return (f"{entry.name} ({grid.describe(inp)}, {inp} inputs) does not fall into GGML blocks of {BLOCK} "
                    "inputs: train with quant_group_size 32, 64, 128 or channel on a model whose layer inputs "
                    f"are multiples of {BLOCK}")
        if not grid.fp16_scales:
            return (f"{entry.name}'s scales are not float16 values, which GGUF stores: train with "
                    "quant_fp16_scales true (the default) for an exact GGUF; dense is exact for this student")
    return None


def _block_scales(scale: torch.Tensor, group_size: int) -> np.ndarray:
    """``(out, in / group)`` → one float16 per block of 32 ``(out, in / 32)``."""
    return scale.repeat_interleave(group_size // BLOCK, dim=1).to(torch.float16).numpy()


def _nibbles(values: np.ndarray) -> np.ndarray:
    """``(out, blocks, 32)`` of 0..15 → ``(out, blocks, 16)`` bytes: input j in the low nibble of
    byte j, input j + 16 in its high nibble (GGML's Q4 layout)."""
    return (values[..., :16] | (values[..., 16:] << 4)).astype(np.uint8)


def blocks(weight: GridWeight, kind: str) -> np.ndarray:
    """The raw GGML blocks of a grid, ``(out, bytes per row)`` uint8."""
    out, inp = weight.codes.shape
    codes = weight.codes.numpy().astype(np.int16).reshape(out, inp // BLOCK, BLOCK)
    parts = [_block_scales(weight.scale, weight.group_size).view(np.uint8).reshape(out, -1, 2)]
    if kind == "Q8_0":
        parts.append(codes.astype(np.int8).view(np.uint8))
    elif kind == "Q4_0":
        parts.append(_nibbles(codes + 8))
    else:  # Q4_1: d, m = -shift, then the unsigned codes
        parts.append((-_block_scales(weight.shift, weight.group_size)).view(np.uint8).reshape(out, -1, 2))
        parts.append(_nibbles(codes))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def llama_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a Llama q / k projection (``convert_hf_to_gguf``'s permute): per
    head, the two rotary halves interleaved."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _row_order(name: str, config) -> torch.Tensor | None:
    if config.model_type != "llama":
        return None
    if name.endswith("self_attn.q_proj.weight"):
        return llama_rows(config.num_attention_heads * _head_dim(config), config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return llama_rows(config.num_key_value_heads * _head_dim(config), config.num_key_value_heads)
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _data(entry: Entry, config) -> np.ndarray:
    value = entry.load()
    order = _row_order(entry.name, config)
    if isinstance(value, fp4_weights.FP4Weight):
        return fp4_weights.gguf_mxfp4_blocks(value.permute_rows(order) if order is not None else value)
    if isinstance(value, GridWeight):
        return blocks(value.permute_rows(order) if order is not None else value, ggml_type(entry))
    if order is not None:
        value = value[order]
    value = value.contiguous().float() if ggml_type(entry) == "F32" else value.contiguous()
    return value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()


def _add_metadata(writer, config, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, folder: Path | None, config) -> None:
    """The byte-level BPE tokenizer of ``folder/tokenizer.json`` as GGUF's ``gpt2`` model."""
    gguf = _gguf()
    path = None if folder is None else folder / "tokenizer.json"
    if path is None or not path.is_file():
        raise FileNotFoundError(f"GGUF export needs the student's tokenizer.json (in {folder}): save the tokenizer "
                                "with the student (hf-sdft recover does)")
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen style); "
                         f"this one is {model.get('type')} with a {(data.get('decoder') or {}).get('type')} decoder")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    size = config.vocab_size  # llama.cpp wants one token per embedding row; ids past it cannot be embedded anyway
    vocab = {text: i for text, i in vocab.items() if i < size}
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the ByteLevel pre-tokenizer's regex is GPT-2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    settings = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])
    writer.add_add_bos_token(False)  # transformers' tokenizer adds no BOS: the same ids either way
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())


def write(weights: StudentWeights, output_dir: Path, file_name: str = "model.gguf") -> list[Path]:
    """Write ``output_dir/model.gguf`` tensor by tensor (plus the tokenizer files and an Ollama
    ``Modelfile`` beside it); returns the files written."""
    gguf = _gguf()
    config = weights.config
    tensor_names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, config.model_type.upper()),
                                            config.num_hidden_layers)
    names = set(kept((e.name for e in weights.entries), config))
    entries = [e for e in weights.entries if e.name in names]
    path = output_dir / file_name
    writer = gguf.GGUFWriter(path, config.model_type)
    _add_metadata(writer, config, output_dir.name)
    kinds = {ggml_type(e) for e in weights.grids()} or {ggml_type(e) for e in entries if len(e.shape) == 2}
    file_type = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
                 "BF16": "MOSTLY_BF16", "MXFP4": "MOSTLY_MXFP4_MOE"}.get(sorted(kinds)[0], "ALL_F32")
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, weights.folder, config)
    for entry in entries:
        gguf_name = tensor_names.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF has no name for {entry.name} of a {config.model_type} model")
        kind = ggml_type(entry)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        if entry.grid is None:
            shape, dtype = entry.shape, {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind]
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes,
                                   raw_dtype=qtype if kind == "BF16" else None)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = entry.shape[1] // block_size * type_size
            writer.add_tensor_info(gguf_name, (entry.shape[0], row_bytes), np.dtype(np.uint8),
                                   entry.shape[0] * row_bytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry in entries:
        writer.write_tensor_data(_data(entry, config))
    writer.close()
    copy_tokenizer(weights.folder, output_dir)
    (output_dir / "Modelfile").write_text(f"FROM ./{file_name}\n")
    return [path]
