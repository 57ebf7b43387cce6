"""vLLM sampling (``use_vllm``). Without a GPU: the weights sent to vLLM, loaded into a plain
transformers model built from the config, give the student's own logits (quanto, LoRA on a frozen
quanto base, pruned + LoRA, an untied head kept in ``modules_to_save``; both small pretrained
models), the plain checkpoint colocated vLLM starts from, and the errors. With CUDA and vLLM: a
real training run whose samples come from vLLM, synced weights checked by greedy decoding."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.compress.checkpoint import load_model
from hf_sdft.compress.prune import prune
from hf_sdft.compress.quantize import quantize_student, save_quantized, thaw_quantized, to_quanto
from hf_sdft.data import default_model_path, pad
from hf_sdft.trainer.vllm_sampling import computed_weights, own_checkpoint, write_plain_checkpoint
from tests.helpers import cpu_args, make_model, make_texts, perturb
from tests.jobs.test_two_models import SECOND
from tests.trainer.test_trainer import lm_dataset

PATHS = {"embedded": default_model_path(), "second": str(SECOND / "model")}


def lora(model, targets=("q_proj", "v_proj", "down_proj"), **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False,
                                            lora_dropout=0.0, **kw))


def plain_logits(student, ids):
    """Logits of a plain model of the student's config holding the weights that would go to vLLM."""
    config = (student.get_base_model() if hasattr(student, "get_base_model") else student).config
    plain = AutoModelForCausalLM.from_config(config).eval()
    missing = plain.load_state_dict(dict(computed_weights(student)), strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    with torch.no_grad():
        return plain(input_ids=ids).logits


def student_for(kind, name):
    model = AutoModelForCausalLM.from_pretrained(PATHS[name])
    if kind == "int4":
        return quantize_student(model, "int4")
    if kind == "frozen-int4+lora":
        return lora(to_quanto(quantize_student(model, "int4")))
    if kind == "2:4+lora":
        prune(model, pattern="2:4")
        return lora(model)
    if kind == "int4+head":  # an untied head trained as a full copy beside the adapters
        student = lora(quantize_student(model, "int4"), modules_to_save=["lm_head"])
        perturb(student.base_model.model.lm_head.modules_to_save["default"], scale=0.3)
        return student
    if kind == "embedding-lora":  # adapters on an untied input embedding
        return lora(model, targets=("embed_tokens", "q_proj"))
    raise KeyError(kind)


@pytest.mark.parametrize("name", ["embedded", "second"])
@pytest.mark.parametrize("kind", ["int4", "frozen-int4+lora", "2:4+lora", "int4+head", "embedding-lora"])
def test_weights_sent_to_vllm_compute_what_the_student_computes(kind, name):
    if kind in ("int4+head", "embedding-lora") and name == "embedded":
        pytest.skip("the embedded model's head is tied to its embeddings: refused, see below")
    student = student_for(kind, name).eval()
    ids = AutoTokenizer.from_pretrained(PATHS[name])(["And it came to pass", "Enter the king"],
                                                    return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    assert torch.allclose(plain_logits(student, ids), expected, atol=1e-4, rtol=1e-4)


def test_quanto_shadow_weights_are_not_what_is_sent():
    """TRL would send the float parameters: for a QAT student those are not the computed weights."""
    student = quantize_student(make_model(), "int2", group_size=None)
    sent = dict(computed_weights(student))
    shadow = student.model.layers[0].self_attn.q_proj.weight
    q = sent["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, shadow)
    assert all(len(torch.unique(row)) <= 4 for row in q)  # int2: four levels per output channel


def test_pruned_zeros_are_sent_as_zeros():
    student = make_model()
    masks = prune(student, sparsity=0.5)
    sent = dict(computed_weights(student))
    for name, keep in masks.items():
        assert torch.equal(sent[f"{name}.weight"] == 0, ~keep)


def test_quanto_checkpoint_gets_a_plain_copy_to_start_from(tmp_path, tokenizer):
    save_quantized(quantize_student(make_model(), "int4"), tmp_path / "q")
    student = load_model(str(tmp_path / "q"))
    assert own_checkpoint(student) is None
    write_plain_checkpoint(student, tokenizer, tmp_path / "boot")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "boot")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "boot").get_vocab() == tokenizer.get_vocab()
    make_model().save_pretrained(tmp_path / "plain")
    assert own_checkpoint(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")) == str(tmp_path / "plain")


@pytest.mark.parametrize(("setup", "match"), [(dict(targets=("embed_tokens",)), "tied"),
                                              (dict(modules_to_save=["lm_head"]), "tied"),
                                              (dict(lora_bias=True), "lora_bias"), (dict(use_dora=True), "DoRA")])
def test_what_a_plain_model_cannot_compute_is_refused(setup, match):
    student = lora(AutoModelForCausalLM.from_pretrained(PATHS["embedded"]), **setup)  # tied head and embedding
    with pytest.raises(ValueError, match=match):
        dict(computed_weights(student))


def test_activation_quantization_is_refused():
    ids = torch.tensor([[3, 4, 5]])
    student = quantize_student(make_model(), "int8", activations="int8", calibration=[{"input_ids": ids}])
    with pytest.raises(ValueError, match="activations"):
        dict(computed_weights(student))


def test_use_vllm_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="on_policy_ratio > 0"):
        SDFTConfig(output_dir=str(tmp_path), use_vllm=True, **cpu_args())
    with pytest.raises(ValueError, match="vllm_mode"):
        SDFTConfig(output_dir=str(tmp_path), use_vllm=True, on_policy_ratio=1.0, vllm_mode="remote", **cpu_args())
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        SDFTConfig(output_dir=str(tmp_path), use_vllm=True, on_policy_ratio=1.0, vllm_gpu_memory_utilization=1.5,
                   **cpu_args())


def vllm_ready() -> bool:
    return is_vllm_available() and torch.cuda.is_available()


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed: TRL would start it")
def test_trl_generation_is_built_from_our_settings(tmp_path, tokenizer):
    """Up to vLLM's own start: TRL's VLLMGeneration accepts every setting we pass, a quanto
    checkpoint gets its plain copy first, and the student's name is put back after."""
    from accelerate import Accelerator

    from hf_sdft.trainer.vllm_sampling import vllm_generation

    save_quantized(quantize_student(make_model(), "int4"), tmp_path / "q")
    student = load_model(str(tmp_path / "q"))
    name = student.name_or_path
    args = SDFTConfig(output_dir=str(tmp_path / "out"), use_vllm=True, on_policy_ratio=1.0, **cpu_args())
    with pytest.raises(ImportError, match="vLLM is not available"):  # TRL's own check, past its arguments
        vllm_generation(student, Accelerator(cpu=True), tokenizer, args)
    assert student.name_or_path == name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "vllm_boot").config.hidden_size == 32


@pytest.mark.skipif(vllm_ready(), reason="vLLM and a GPU are here: the run below is the test")
def test_use_vllm_without_vllm_says_what_to_install(tmp_path, tokenizer):
    args = SDFTConfig(output_dir=str(tmp_path), use_vllm=True, on_policy_ratio=1.0, **cpu_args(max_steps=1))
    with pytest.raises((ImportError, RuntimeError), match="use_vllm"):
        SDFTTrainer(model=perturb(make_model()), args=args, teacher_model=make_model(),
                    train_dataset=lm_dataset(tokenizer, make_texts(16)), processing_class=tokenizer, data_collator=pad)


@pytest.mark.skipif(not vllm_ready(), reason="needs a CUDA GPU and vLLM (pip install 'trl[vllm]')")
def test_on_policy_training_samples_with_colocated_vllm(tmp_path):
    """An int4 student of the embedded model (a quanto checkpoint vLLM cannot load: it starts from
    the plain copy) trains on vLLM's samples; after training, vLLM's greedy continuation equals the
    student's own greedy ``model.generate``, so the weights were synced as computed."""
    tokenizer = AutoTokenizer.from_pretrained(PATHS["embedded"])
    teacher = AutoModelForCausalLM.from_pretrained(PATHS["embedded"])
    save_quantized(quantize_student(copy.deepcopy(teacher), "int4"), tmp_path / "q")
    student = thaw_quantized(load_model(str(tmp_path / "q")))  # trainable again, as the recovery job does
    texts = ["And it came to pass in those days", "In the beginning God created the heaven"] * 8
    args = SDFTConfig(output_dir=str(tmp_path / "out"), use_vllm=True, vllm_gpu_memory_utilization=0.2,
                      on_policy_ratio=1.0, max_new_tokens=8, prompt_length=4, per_device_train_batch_size=4,
                      max_steps=2, learning_rate=1e-3, report_to=[], bf16=False, logging_steps=1, save_strategy="no")
    trainer = SDFTTrainer(model=student, args=args, teacher_model=teacher, processing_class=tokenizer,
                          train_dataset=lm_dataset(tokenizer, texts), data_collator=pad)
    trainer.train()
    assert (tmp_path / "out" / "vllm_boot" / "config.json").exists()
    logged = [h for h in trainer.state.log_history if "on_policy/gen_tokens" in h]
    assert logged and all(h["on_policy/fraction"] == 1.0 and h["on_policy/gen_tokens"] > 0 for h in logged)

    engine = trainer.on_policy.vllm
    engine.sync_weights()
    engine.temperature = 0.0  # greedy
    prompt = tokenizer("And it came to pass")["input_ids"]
    _, completions, _, _ = engine.generate(prompts=[prompt], images=None, num_generations=1)
    model = trainer.model.eval()
    completion = list(completions[0])
    assert completion
    with torch.no_grad():  # each greedy vLLM token is the trained student's argmax, up to vLLM's bfloat16
        logits = model(input_ids=torch.tensor([prompt + completion], device=model.device)).logits[0].float()
    for t, token in enumerate(completion):
        row = logits[len(prompt) + t - 1]
        assert row.max() - row[token] < 0.05 * row.abs().max()
