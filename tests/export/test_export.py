"""Export on both models, checked by real clients: transformers in an interpreter where hf-sdft
cannot be imported (tests/export/client.py), compressed-tensors' own ModelCompressor, and llama.cpp
(llama-cpp-python, built from its sdist by the test extra) running the GGUF.

Students: the embedded Llama (tied head, q/k rows permuted in GGUF) and the second Qwen2 (grouped
KV heads, q/k/v biases, untied head), each as int4 symmetric in groups of 32 and 128 (channel on the
second model, whose 160 inputs 128 does not divide), int4 symmetric with learned scales after two
optimizer steps, int8, int2 symmetric, int4 on quanto's asymmetric grid (GGUF Q4_1), and 2:4-pruned.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hf_sdft.compress.checkpoint import load_model
from hf_sdft.compress.prune import prune
from hf_sdft.compress.quantize import quantize_student, quantized_modules, save_quantized
from hf_sdft.data import default_model_path, load_texts
from hf_sdft.export import EXPORT_FORMATS, exact_formats, export_student, read_student
from hf_sdft.export.to_compressed_tensors import pack_int32
from hf_sdft.export.to_gguf import llama_rows
from hf_sdft.jobs.evaluation import nll_and_count, perplexity_of
from hf_sdft.jobs.export import llama_cpp_nll
from hf_sdft.modeling import from_pretrained
from tests.jobs.test_two_models import SECOND

CLIENT = Path(__file__).with_name("client.py")
PATHS = {"embedded": default_model_path(), "second": str(SECOND / "model")}
EVAL_TEXT = {"embedded": None, "second": SECOND / "data" / "eval.txt"}
ALL = ("compressed-tensors", "gguf", "dense")
CASES = {  # name: (what, bits, group size (embedded, second), symmetric, exact formats)
    "int4-sym-g32": ("quant", 4, (32, 32), True, ALL),
    "int4-sym-g128": ("quant", 4, (128, None), True, ALL),
    "int4-sym-g32-learned": ("learned", 4, (32, 32), True, ALL),
    "int8": ("quant", 8, (None, None), True, ALL),
    "int2-sym-g32": ("quant", 2, (32, 32), True, ALL),
    "int4-asym-g32": ("quant", 4, (32, 32), False, ("gguf", "dense")),
    "pruned-2of4": ("prune", None, (None, None), None, ALL),
}
LOGITS_TOL = 1e-4  # float32 logits of the same weights through another load path (observed: 0)
LLAMA_CPP_REL_TOL = 0.01  # llama.cpp quantizes activations to 8 bits in its CPU matmuls (observed ≤ 0.1 %)
LLAMA_CPP_F32_REL_TOL = 1e-4  # float weights: only float32 summation order differs


def held_out_ids(model_name: str, tokenizer, blocks: int = 6, length: int = 64) -> torch.Tensor:
    if EVAL_TEXT[model_name] is None:
        from hf_sdft.data import default_data_file

        text = " ".join(load_texts(data_file=default_data_file("eval"))[:200])
    else:
        text = EVAL_TEXT[model_name].read_text()
    ids = tokenizer(text[:40000])["input_ids"]
    return torch.tensor(ids[: blocks * length]).reshape(blocks, length)


def make_student(teacher, case: str, model_name: str, ids: torch.Tensor):
    what, bits, groups, symmetric, _ = CASES[case]
    student = copy.deepcopy(teacher)
    group = groups[0 if model_name == "embedded" else 1]
    if what == "prune":
        prune(student, pattern="2:4")
        return student
    quantize_student(student, f"int{bits}", group_size=group, symmetric=symmetric, fp16_scales=True,
                     learn_scales=what == "learned")
    if what == "learned":  # scales and shifts move off the min/max grid, on float16 values
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
        for _ in range(2):
            student(input_ids=ids[:2], labels=ids[:2]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return student


def computed_weights(model) -> dict[str, torch.Tensor]:
    """The weights ``model`` computes with, by transformers parameter name."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.endswith((".weight_scale", ".weight_shift"))}
    for name, module in quantized_modules(model).items():
        weights[f"{name}.weight"] = module.quantized_weight().clone()
    return weights


@pytest.fixture(scope="module", params=list(PATHS))
def exported(request, tmp_path_factory):
    """Per model: every case saved as hf-sdft saves it, exported to its exact formats, with the
    student's reference weights and logits; then the client's results."""
    model_name = request.param
    root = tmp_path_factory.mktemp(model_name)
    tokenizer = AutoTokenizer.from_pretrained(PATHS[model_name])
    teacher = from_pretrained(PATHS[model_name], dtype=torch.float32)
    ids = held_out_ids(model_name, tokenizer)
    jobs, students = [], {}
    for case, (*_, formats) in CASES.items():
        student = make_student(teacher, case, model_name, ids).eval()
        with torch.no_grad():
            reference = {"weights": computed_weights(student), "ids": ids, "logits": student(input_ids=ids).logits}
        torch.save(reference, root / f"{case}.pt")
        folder = root / case
        if quantized_modules(student):
            save_quantized(student, folder)
        else:
            student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        assert exact_formats(read_student(folder)) == list(formats), case
        for fmt in formats:
            export_student(folder, fmt, root / f"{case}-{fmt}")
            jobs.append({"name": case, "folder": str(root / f"{case}-{fmt}"), "format": fmt,
                         "reference": str(root / f"{case}.pt")})
        students[case] = (folder, reference)
    (root / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(CLIENT), str(root / "jobs.json"), str(root / "results.json")], check=True,
                   cwd=root)
    return model_name, root, students, json.loads((root / "results.json").read_text())


def test_transformers_without_hf_sdft_loads_every_export_with_the_students_weights(exported):
    model_name, _, _, results = exported
    expected = {f"{case}|{fmt}|{how}" for case, (*_, formats) in CASES.items() for fmt in formats
                for how in (("default", "dequantize") if fmt == "compressed-tensors" else ("default",))}
    assert set(results) == expected
    for key, r in results.items():
        assert r["max_logits_diff"] <= LOGITS_TOL, (model_name, key, r)
        if "max_weight_diff" in r:
            assert r["missing"] == [] and r["max_weight_diff"] == 0.0, (model_name, key, r)
            assert r["dtypes"] == ["torch.float32"], (model_name, key, r)
    # the default compressed-tensors load keeps the weights compressed (transformers' own layers)
    assert any(k.endswith("compressed-tensors|default") for k in results)


def test_exported_files_hold_the_grid(exported):
    """Sizes follow the grid: packed int4 well under float32 (the float embedding and head stay),
    int2 smaller still in compressed-tensors but not in GGUF (said in the card), and the dense
    export is float32 with the student's zeros."""
    _, root, students, _ = exported
    size = {p.parent.name: p.stat().st_size for p in root.glob("*/model.*") if p.suffix in (".gguf", ".safetensors")}
    dense = size["pruned-2of4-dense"]
    assert size["int4-sym-g32-compressed-tensors"] < 0.6 * dense
    assert size["int2-sym-g32-compressed-tensors"] < size["int4-sym-g32-compressed-tensors"]
    assert size["int2-sym-g32-gguf"] == size["int4-sym-g32-gguf"]
    _, reference = students["pruned-2of4"]
    zeros = sum(int((w == 0).sum()) for k, w in reference["weights"].items() if "layers" in k and w.dim() == 2)
    assert zeros > 0.45 * sum(w.numel() for k, w in reference["weights"].items() if "layers" in k and w.dim() == 2)
    report = json.loads((root / "int4-asym-g32-gguf" / "export.json").read_text())
    assert report["exact"] and "asymmetric" in report["grid"] and report["files"] == ["model.gguf"]


def test_llama_cpp_runs_each_gguf_at_the_students_perplexity(exported):
    """A real engine: llama.cpp scores held-out blocks with each exported GGUF (Q4_0, Q4_1, Q8_0,
    F32); its perplexity is the student's within LLAMA_CPP_REL_TOL (F32: LLAMA_CPP_F32_REL_TOL)."""
    model_name, root, students, _ = exported
    for case in ("int4-sym-g32", "int4-asym-g32", "int8", "int2-sym-g32", "pruned-2of4"):
        folder, reference = students[case]
        batches = [{"input_ids": reference["ids"]}]
        student = perplexity_of(*nll_and_count(load_model(str(folder)), batches))
        engine = perplexity_of(*llama_cpp_nll(root / f"{case}-gguf" / "model.gguf", batches))
        tol = LLAMA_CPP_F32_REL_TOL if case == "pruned-2of4" else LLAMA_CPP_REL_TOL
        assert abs(engine - student) / student < tol, (model_name, case, engine, student)


def test_llama_cpp_tokenizes_like_the_student(exported):
    from llama_cpp import Llama

    model_name, root, students, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(PATHS[model_name])
    llm = Llama(model_path=str(root / "int4-sym-g32-gguf" / "model.gguf"), vocab_only=True, verbose=False)
    text = "And it came to pass, in the morning: the king's men (all 12 of them) went out.\nThou art"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    llm.close()


def test_compressed_tensors_agrees_with_its_own_writer(tmp_path):
    """For one int4 case, the compressed-tensors library's ModelCompressor, given the same
    weights and scales, writes the same tensors (byte for byte) and an equivalent config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from safetensors.torch import load_file

    teacher = from_pretrained(PATHS["embedded"], dtype=torch.float32)
    student = make_student(teacher, "int4-sym-g32", "embedded", None)
    save_quantized(copy.deepcopy(student), tmp_path / "student")
    AutoTokenizer.from_pretrained(PATHS["embedded"]).save_pretrained(tmp_path / "student")
    export_student(tmp_path / "student", "compressed-tensors", tmp_path / "ours")

    library = copy.deepcopy(teacher)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(library, config)
    with torch.no_grad():
        for name, layer in quantized_modules(student).items():
            module = library.get_submodule(name)
            _, scale, _ = layer.quantized()
            module.weight.copy_(layer.quantized_weight())
            module.weight_scale.data = scale.reshape(module.weight.shape[0], -1).clone()
    compressor = ModelCompressor.from_pretrained_model(library, quantization_format="pack-quantized")
    compressor.compress_model(library)
    library.save_pretrained(tmp_path / "library")
    compressor.update_config(tmp_path / "library")

    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "library" / "model.safetensors")
    theirs.pop("lm_head.weight", None)  # tied to the embedding: we write it once
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert ours[key].contiguous().view(torch.uint8).numpy().tobytes() == \
            theirs[key].contiguous().view(torch.uint8).numpy().tobytes(), key
    mine = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    lib = json.loads((tmp_path / "library" / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(mine) == QuantizationConfig.model_validate(lib)
    for key, value in mine.items():
        assert key in lib, key
        if key != "config_groups":
            assert lib[key] == value, key
    assert mine["config_groups"]["group_0"]["weights"] == lib["config_groups"]["group_0"]["weights"]


def test_packing_and_row_order_against_independent_computations():
    """compressed-tensors' int32 words and llama.cpp's q/k row order, each against a loop written
    from the formats' definitions."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 64), generator=g)
        words = pack_int32(codes, bits)
        for r in range(5):
            for w in range(words.shape[1]):
                expected = sum((int(codes[r, w * 32 // bits + i]) + 2 ** (bits - 1)) << (bits * i)
                               for i in range(32 // bits))
                assert int(words[r, w]) & 0xFFFFFFFF == expected
        assert torch.equal(words, pack_to_int32(codes.to(torch.int8), bits))
    heads, dim = 3, 8
    order = llama_rows(heads * dim, heads)
    expected = [h * dim + half * dim // 2 + i for h in range(heads) for i in range(dim // 2) for half in (0, 1)]
    assert order.tolist() == expected


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    teacher = from_pretrained(PATHS["embedded"], dtype=torch.float32)
    folder = tmp_path / "asym"
    save_quantized(make_student(teacher, "int4-asym-g32", "embedded", None), folder)
    AutoTokenizer.from_pretrained(PATHS["embedded"]).save_pretrained(folder)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="unknown export format 'onnx': choose one of compressed-tensors, gguf, dense"):
        export_student(folder, "onnx", tmp_path / "out")
    with pytest.raises(ValueError, match=r"no exact compressed-tensors form.*asymmetric.*Exact formats for it: gguf, "
                                         r"dense.*--allow_rounding"):
        export_student(folder, "compressed-tensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        export_student(tmp_path / "taken", "gguf", tmp_path / "out")
    with pytest.raises(FileExistsError, match="exists: choose another output_dir, or pass --overwrite true"):
        export_student(folder, "gguf", tmp_path / "taken")
    assert sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")) == before


def test_allow_rounding_requantizes_and_reports_the_error(tmp_path):
    teacher = from_pretrained(PATHS["embedded"], dtype=torch.float32)
    folder = tmp_path / "asym"
    save_quantized(make_student(teacher, "int4-asym-g32", "embedded", None), folder)
    AutoTokenizer.from_pretrained(PATHS["embedded"]).save_pretrained(folder)
    report = export_student(folder, "compressed-tensors", tmp_path / "ct", allow_rounding=True)
    assert not report.exact and report.rounding["requantized_layers"] == 28
    assert 0 < report.rounding["relative_weight_error"] < 0.2 and report.rounding["max_abs_weight_error"] > 0
    assert json.loads((tmp_path / "ct" / "export.json").read_text())["rounding"] == report.rounding


def test_peft_student_exports_merged(tmp_path):
    """A LoRA student (adapters on a float base) exports as its merged weights."""
    from peft import LoraConfig, get_peft_model

    teacher = from_pretrained(PATHS["embedded"], dtype=torch.float32)
    model = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    AutoTokenizer.from_pretrained(PATHS["embedded"]).save_pretrained(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = PATHS["embedded"]
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    report = export_student(tmp_path / "lora", "dense", tmp_path / "dense")
    assert report.exact and report.source_format == "peft (merged)"
    merged = model.merge_and_unload().state_dict()
    exported = from_pretrained(str(tmp_path / "dense"), dtype=torch.float32).state_dict()
    assert max((exported[k] - v).abs().max().item() for k, v in merged.items()) < 1e-6


def test_sharded_float_folder_streams_into_every_format(tmp_path):
    """A transformers folder in several shards (read through safe_open, one tensor at a time)
    exports to every format with its weights unchanged."""
    teacher = from_pretrained(PATHS["second"], dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "sharded", max_shard_size="3MB")
    AutoTokenizer.from_pretrained(PATHS["second"]).save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    for fmt in EXPORT_FORMATS:
        export_student(tmp_path / "sharded", fmt, tmp_path / fmt)
    kwargs = {"gguf_file": "model.gguf"}
    for fmt in EXPORT_FORMATS:
        loaded = from_pretrained(str(tmp_path / fmt), dtype=torch.float32, **(kwargs if fmt == "gguf" else {}))
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items()), fmt


@pytest.mark.parametrize("model_name", list(PATHS))
def test_a_half_precision_student_runs_in_llama_cpp(tmp_path, model_name):
    """A float16 student (e.g. a teacher exported for comparison, or a student saved in half
    precision): matrices stay F16, vectors (norms, Qwen2's q/k/v biases) are written in F32 as
    llama.cpp's CPU kernels need; llama.cpp runs it at the float16 model's perplexity."""
    from gguf import GGUFReader

    half = from_pretrained(PATHS[model_name], dtype=torch.float16)
    half.save_pretrained(tmp_path / "half")
    tokenizer = AutoTokenizer.from_pretrained(PATHS[model_name])
    tokenizer.save_pretrained(tmp_path / "half")
    export_student(tmp_path / "half", "gguf", tmp_path / "gguf")
    types = {t.name: (t.tensor_type.name, len(t.shape)) for t in GGUFReader(tmp_path / "gguf" / "model.gguf").tensors}
    assert {kind for kind, dims in types.values() if dims == 1} == {"F32"}
    assert {kind for kind, dims in types.values() if dims == 2} == {"F16"}
    batches = [{"input_ids": held_out_ids(model_name, tokenizer)}]
    student = perplexity_of(*nll_and_count(half.float(), batches))  # float16 weights, float32 compute as llama.cpp
    engine = perplexity_of(*llama_cpp_nll(tmp_path / "gguf" / "model.gguf", batches))
    assert abs(engine - student) / student < LLAMA_CPP_REL_TOL, (engine, student)


def test_read_tensor_equals_safetensors_and_names_a_truncated_file(tmp_path):
    """Export's own reader (plain file reads, no memory map) gives safetensors' tensors exactly."""
    from safetensors.torch import load_file, save_file

    from hf_sdft.export.student_weights import read_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=g).half(), "i32": torch.randint(-9, 9, (4, 3), dtype=torch.int32),
               "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    expected = load_file(str(tmp_path / "t.safetensors"))
    for key, value in expected.items():
        got = read_tensor(tmp_path / "t.safetensors", key)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
    with pytest.raises(KeyError, match="holds no tensor missing"):
        read_tensor(tmp_path / "t.safetensors", "missing")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    last = max(expected, key=lambda k: json.loads(data[8:8 + int.from_bytes(data[:8], "little")])[k]["data_offsets"][1]
               if k != "__metadata__" else -1)
    with pytest.raises(OSError, match=f"tensor {last} is cut short"):
        read_tensor(tmp_path / "cut.safetensors", last)


def test_export_verb(tmp_path, capsys):
    from hf_sdft.cli import main

    teacher = from_pretrained(PATHS["embedded"], dtype=torch.float32)
    folder = tmp_path / "student"
    save_quantized(make_student(teacher, "int4-sym-g32", "embedded", None), folder)
    AutoTokenizer.from_pretrained(PATHS["embedded"]).save_pretrained(folder)
    main(["export", str(folder), "--format", "gguf", "--max_eval_blocks", "4"])
    out = capsys.readouterr().out
    assert "gguf: int4 symmetric, groups of 32, float16 scales (28 layers), exact" in out
    assert (folder / "gguf" / "model.gguf").is_file() and (folder / "gguf" / "Modelfile").is_file()
    measured = json.loads((folder / "gguf" / "export.json").read_text())["measured"]
    assert measured["perplexity_transformers"] == measured["perplexity_student"]
    assert abs(measured["perplexity_llama_cpp"] / measured["perplexity_student"] - 1) < LLAMA_CPP_REL_TOL
