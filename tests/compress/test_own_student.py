"""Recovering a student made elsewhere (``--student_name_or_path``): an SFT'd transformers folder,
a pruned checkpoint with plain zeros, a quantized folder (hf-sdft's or quanto's own format) and a
PEFT adapter folder; and the errors for students that do not match their original."""

import copy
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_sdft.compress.checkpoint import load_model
from hf_sdft.compress.prune import masks_from_zeros, prune, sparsity_report
from hf_sdft.compress.quantize import load_quantized, quantize_student, save_quantized
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.jobs.recovery_data import load_recovery_data
from tests.helpers import make_model, make_tokenizer, perturb, write_tiny_inputs
from tests.jobs.test_recover import recover


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_inputs(tmp_path_factory.mktemp("own"))


def original(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "model")


def eval_ppl(tiny, model) -> float:
    """Held-out perplexity measured apart from the job, on the same held-out set."""
    from hf_sdft.jobs.config import RecoveryArguments

    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    return perplexity(model, load_recovery_data(rec, make_tokenizer(), default_model=False).eval.batches)


def kl_to_original(tiny, model) -> float:
    """Mean KL(original ‖ model) of next-token distributions on the held-out text, computed here."""
    from hf_sdft.jobs.config import RecoveryArguments

    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    teacher, total, n = original(tiny), 0.0, 0
    with torch.no_grad():
        for b in load_recovery_data(rec, make_tokenizer(), default_model=False).eval.batches:
            p = torch.log_softmax(teacher(input_ids=b["input_ids"]).logits.double(), -1)
            q = torch.log_softmax(model(input_ids=b["input_ids"]).logits.double(), -1)
            total += (p.exp() * (p - q)).sum().item()
            n += b["input_ids"].numel()
    return total / n


def closer(tiny, degraded, recovered) -> bool:
    """Recovery moved the student's next-token distributions towards the original's."""
    return kl_to_original(tiny, recovered) < kl_to_original(tiny, degraded)


def own(tiny, out, student, *extra):
    """The job on your own student, handing back its trained state (these tests check what training
    did; keeping the best state is tests/jobs/test_keep_best.py's)."""
    return recover(tiny, out, "--student_name_or_path", str(student), "--learning_rate", "1e-2",
                   "--keep_best_model", "false", *extra)[0]


def test_finetuned_student(tiny, tmp_path):
    student = perturb(original(tiny), scale=0.3)
    student.save_pretrained(tmp_path / "student")
    stats = own(tiny, tmp_path / "out", tmp_path / "student")
    assert stats["degradation"] == {"kind": "own", "student": "student"}  # the stats hold no local paths
    assert stats["perplexity"]["degraded"] == pytest.approx(eval_ppl(tiny, student), rel=1e-6)
    assert stats["format"] == "transformers"
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert eval_ppl(tiny, out) == pytest.approx(stats["perplexity"]["recovered"], rel=1e-5)
    assert closer(tiny, student, out)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_pruned_checkpoint_keeps_its_zeros(tiny, tmp_path, lora):
    student = original(tiny)
    masks = prune(student, pattern="2:4")
    student.save_pretrained(tmp_path / "pruned")  # ordinary weights with zeros, no masks
    extra = ["--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "up_proj"] if lora else []
    stats = own(tiny, tmp_path / "out", tmp_path / "pruned", *extra)
    sparsity = stats["degradation"]["sparsity"]
    assert sparsity["pattern"] == "2:4" and sparsity["kept"] and set(sparsity["layers"]) == set(masks)
    assert all(v == pytest.approx(0.5) for v in sparsity["layers"].values())
    assert "pruned" in stats["tags"] and "2:4" in stats["tags"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Degradation (detected in the student)" in card and "| sparsity: sparsity pattern | 2:4 |" in card
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert closer(tiny, AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"), recovered)
    for name, mask in masks_from_zeros(recovered).items():
        assert torch.equal(mask, masks[name]), name


def test_pruned_zeros_may_fill_without_keep_sparsity(tiny, tmp_path):
    student = original(tiny)
    prune(student, sparsity=0.5)
    student.save_pretrained(tmp_path / "pruned")
    stats = own(tiny, tmp_path / "out", tmp_path / "pruned", "--keep_sparsity", "false")
    assert stats["degradation"]["sparsity"]["kept"] is False
    assert sparsity_report(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))["total"] < 0.1


def test_dense_student_is_not_taken_for_pruned(tiny, tmp_path):
    original(tiny).save_pretrained(tmp_path / "dense")
    stats = own(tiny, tmp_path / "out", tmp_path / "dense", "--max_steps", "2")
    assert "sparsity" not in stats["degradation"]


def test_quantized_folder(tiny, tmp_path):
    student = quantize_student(original(tiny), "int2", group_size=None)
    save_quantized(student, tmp_path / "q")
    stats = own(tiny, tmp_path / "out", tmp_path / "q")
    assert stats["degradation"]["quantization"] == {"weights": ["int2"], "activations": [], "layers": 14}
    assert stats["perplexity"]["degraded"] == pytest.approx(eval_ppl(tiny, load_quantized(tmp_path / "q")), rel=1e-4)
    assert stats["format"] == "quanto"
    out = load_quantized(tmp_path / "out")
    assert eval_ppl(tiny, out) == pytest.approx(stats["perplexity"]["recovered"], rel=1e-5)
    assert closer(tiny, load_quantized(tmp_path / "q"), out)


def test_quantized_folder_with_clipped_grid_learns_its_scales(tiny, tmp_path):
    from .test_quant_params import batch

    student = quantize_student(original(tiny), "int2", group_size=16, calibration=[batch()], clip=True)
    save_quantized(student, tmp_path / "q")
    stats = own(tiny, tmp_path / "out", tmp_path / "q", "--quant_learn_scales", "true")
    assert stats["degradation"]["learned_scales"] is True
    # thawed on the saved (clipped) grid: the degraded student is the saved one, exactly
    assert stats["perplexity"]["degraded"] == pytest.approx(eval_ppl(tiny, load_quantized(tmp_path / "q")), rel=1e-6)
    out = load_quantized(tmp_path / "out")
    assert eval_ppl(tiny, out) == pytest.approx(stats["perplexity"]["recovered"], rel=1e-6)
    saved = out.model.layers[0].mlp.up_proj.weight._scale
    assert not torch.equal(saved, load_quantized(tmp_path / "q").model.layers[0].mlp.up_proj.weight._scale)
    with pytest.raises(ValueError, match="quant_learn_scales trains"):
        own(tiny, tmp_path / "peft", tmp_path / "q", "--quant_learn_scales", "true", "--use_peft", "true")


def test_quanto_own_format_loads_with_its_logits(tiny, tmp_path):
    from optimum.quanto import QuantizedModelForCausalLM, qint4

    wrapped = QuantizedModelForCausalLM.quantize(original(tiny), weights=qint4, exclude="lm_head")
    wrapped.save_pretrained(tmp_path / "quanto")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "quanto"))(input_ids=ids).logits, wrapped(input_ids=ids).logits)


def test_adapter_folder_is_recovered_as_adapters(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = original(tiny)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapters")  # names tiny/model as its base
    stats = own(tiny, tmp_path / "out", tmp_path / "adapters")
    assert stats["degradation"]["adapters"] == {"type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert stats["format"] == "peft" and (tmp_path / "out" / "adapter_config.json").exists()
    reloaded = load_model(str(tmp_path / "out"))
    assert eval_ppl(tiny, reloaded) == pytest.approx(stats["perplexity"]["recovered"], rel=1e-5)
    assert closer(tiny, load_model(str(tmp_path / "adapters")), reloaded)
    base_after = reloaded.get_base_model()
    with reloaded.disable_adapter():  # the base was not trained: adapters off, the original's logits
        ids = torch.tensor([[3, 4, 5, 6]])
        assert torch.equal(base_after(input_ids=ids).logits, original(tiny)(input_ids=ids).logits)


def truncate(file):
    """Keep the first half of ``file``'s bytes (an interrupted copy or download)."""
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    return file


class TestTruncatedWeights:
    """A truncated ``model.safetensors`` is named, with what to do, wherever a folder is loaded."""

    def expect(self, file):
        return pytest.raises(OSError, match=re.escape(str(file.resolve())) + " is truncated or corrupt .*: re-save")

    def test_student_folder(self, tiny, tmp_path):
        original(tiny).save_pretrained(tmp_path / "s")
        with self.expect(truncate(tmp_path / "s" / "model.safetensors")):
            own(tiny, tmp_path / "out", tmp_path / "s")

    def test_quantized_student_folder(self, tiny, tmp_path):
        save_quantized(quantize_student(original(tiny), "int4", group_size=None), tmp_path / "q")
        with self.expect(truncate(tmp_path / "q" / "model.safetensors")):
            own(tiny, tmp_path / "out", tmp_path / "q")

    def test_adapter_folder(self, tiny, tmp_path):
        from peft import LoraConfig, get_peft_model

        get_peft_model(original(tiny), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
        with self.expect(truncate(tmp_path / "a" / "adapter_model.safetensors")):
            load_model(str(tmp_path / "a"))

    def test_original_folder(self, tiny, tmp_path):
        shutil.copytree(tiny / "model", tmp_path / "model")
        with self.expect(truncate(tmp_path / "model" / "model.safetensors")):
            recover(tiny, tmp_path / "out", "--model_name_or_path", str(tmp_path / "model"))


class TestMismatchedStudents:
    def test_missing_folder(self, tiny, tmp_path):
        with pytest.raises(FileNotFoundError, match="student_name_or_path ./nope: no such folder"):
            own(tiny, tmp_path, "./nope")

    def test_missing_original(self, tiny, tmp_path):
        with pytest.raises(FileNotFoundError, match="model_name_or_path /no/such/model: no such folder"):
            recover(tiny, tmp_path, "--model_name_or_path", "/no/such/model")

    def test_other_architecture(self, tiny, tmp_path):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
        with pytest.raises(ValueError, match="the student is a qwen2 model and the original a llama one"):
            own(tiny, tmp_path / "out", tmp_path / "qwen")

    def test_other_vocabulary(self, tiny, tmp_path):
        make_model(vocab_size=40).save_pretrained(tmp_path / "v40")
        with pytest.raises(ValueError, match="student has 40 output logits, original 32"):
            own(tiny, tmp_path / "out", tmp_path / "v40")

    def test_other_tokenizer(self, tiny, tmp_path):
        student = copy.deepcopy(original(tiny))
        student.save_pretrained(tmp_path / "s")
        tok = make_tokenizer()
        tok.add_tokens(["zz"])  # same model, a tokenizer that is not the original's
        tok.save_pretrained(tmp_path / "s")
        with pytest.raises(ValueError, match="tokenizer saved with the student .* differs from the original's"):
            own(tiny, tmp_path / "out", tmp_path / "s")

    def test_adapters_plus_new_lora(self, tiny, tmp_path):
        from peft import LoraConfig, get_peft_model

        get_peft_model(original(tiny), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
        with pytest.raises(ValueError, match="is a PEFT adapter folder: drop --use_peft"):
            own(tiny, tmp_path / "out", tmp_path / "a", "--use_peft", "true")
