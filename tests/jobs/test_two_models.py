"""Every feature on both small pretrained models: the embedded default (Llama, tied head, KJV,
.jsonl documents) and the second test model (tests/assets/second_model: Qwen2, grouped-query
attention, q/k/v biases, untied head, Shakespeare scenes as blank-line-separated .txt)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.cli import _recipe_parser
from hf_sdft.compress import get_degradation
from hf_sdft.data import default_model_path, load_texts, pack_blocks, pad
from hf_sdft.jobs.recover import run_recovery
from hf_sdft.trainer.teacher_cache import cache_teacher
from tests.helpers import cpu_args

SECOND = Path(__file__).resolve().parents[1] / "assets" / "second_model"
MODELS = {  # name: (flags choosing the model and its data, narrow-task flags, chat flags)
    "embedded": ([], [], ["--default_data", "chat"]),
    "second": (["--model_name_or_path", str(SECOND / "model"), "--train_file", str(SECOND / "data" / "train.txt"),
                "--eval_file", str(SECOND / "data" / "eval.txt"), "--txt_sample_by", "paragraph"],
               ["--narrow_train_file", str(SECOND / "data" / "narrow_train.txt"),
                "--narrow_eval_file", str(SECOND / "data" / "narrow_eval.txt")],
               ["--model_name_or_path", str(SECOND / "model"),
                "--train_file", str(SECOND / "data" / "chat_train.jsonl"),
                "--eval_file", str(SECOND / "data" / "chat_eval.jsonl"),
                "--narrow_train_file", str(SECOND / "data" / "narrow_chat_train.jsonl"),
                "--narrow_eval_file", str(SECOND / "data" / "narrow_chat_eval.jsonl")]),
}
SMALL = ["--learning_rate", "1e-3", "--forgetting_learning_rate", "1e-3", "--block_size", "128",
         "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--bf16", "false",
         "--gradient_checkpointing", "false", "--warmup_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true",
         "--max_eval_blocks", "48", "--probe_blocks", "8", "--cka_every_n_steps", "1000"]


def job(tmp_path, model, *flags):
    argv = [*MODELS[model][0], *SMALL, *flags, "--output_dir", str(tmp_path)]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    return run_recovery(rec, args, model_args)


def model_and_tokenizer(model):
    path = default_model_path() if model == "embedded" else str(SECOND / "model")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_second_model_is_what_its_card_says():
    model, tokenizer = model_and_tokenizer("second")
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    assert model.config.num_key_value_heads < model.config.num_attention_heads and tokenizer.bos_token is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("model", list(MODELS))
def test_held_out_text_is_read_as_the_model_was_trained(tmp_path, model):
    """The job's teacher perplexity is the one measured by the model's own training script."""
    stats = job(tmp_path, model, "--degradation", "none", "--max_steps", "1", "--max_eval_blocks", "1000")
    if model == "second":
        expected = json.loads((SECOND / "model" / "training_log.json").read_text())["eval_ppl"]
    else:
        expected = 20.18  # hf_sdft/default_model/README.md: the whole held-out split
    assert stats["perplexity"]["teacher"] == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("degradation", [
    ["--degradation", "quanto", "--quant_weights", "int2", "--quant_group_size", "32"],
    ["--degradation", "prune", "--prune_sparsity", "0.5"],
    ["--degradation", "prune", "--prune_pattern", "2:4"],
    ["--degradation", "forgetting", "--forgetting_steps", "30"],
], ids=["int2", "prune-50", "2of4", "forgetting"])
def test_every_degradation_recovers(tmp_path, model, degradation):
    narrow = MODELS[model][1] if "forgetting" in degradation else []
    stats = job(tmp_path, model, *degradation, *narrow, "--max_steps", "15")
    p = stats["perplexity"]
    assert p["degraded"] > p["teacher"] and stats["recovery_ratio"] > 0.2, p
    assert stats["cka"]["mean_after"] > stats["cka"]["mean_before"]


@pytest.mark.parametrize("model", list(MODELS))
def test_own_pruned_student_keeps_its_zeros(tmp_path, model):
    teacher, tokenizer = model_and_tokenizer(model)
    student = copy.deepcopy(teacher)
    get_degradation("prune", sparsity=0.5, pattern="unstructured").apply(student)
    student.save_pretrained(tmp_path / "student")
    zeros = {n: p == 0 for n, p in student.named_parameters() if "mlp" in n}
    stats = job(tmp_path / "out", model, "--student_name_or_path", str(tmp_path / "student"), "--max_steps", "10")
    assert stats["degradation"]["sparsity"]["pattern"] == "unstructured"
    assert stats["perplexity"]["recovered"] < stats["perplexity"]["degraded"]
    recovered = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert all(bool((recovered[n][z] == 0).all()) for n, z in zeros.items())


@pytest.mark.parametrize("model", list(MODELS))
def test_chat_forgetting_recipe(tmp_path, model):
    stats = job(tmp_path, model, "--config", "recipes/forgetting-chat.yaml", *MODELS[model][2], *SMALL,
                "--max_steps", "20", "--forgetting_steps", "30")
    p, narrow = stats["perplexity"], stats["narrow_perplexity"]
    assert narrow["degraded"] < narrow["teacher"] and p["degraded"] > p["teacher"]  # learned the narrow task, forgot
    assert stats["recovery_ratio"] > 0.3


@pytest.mark.parametrize("model", list(MODELS))
def test_fused_online_and_cached_losses_agree(tmp_path, model):
    """On both heads (tied Llama, untied Qwen2): the fused loss, the model's own logits, and a
    full-vocabulary teacher cache give the same loss and the same gradients."""
    teacher, tokenizer = model_and_tokenizer(model)
    student = copy.deepcopy(teacher)
    get_degradation("prune", sparsity=0.5, pattern="unstructured").apply(student)
    texts = load_texts(data_file=str(SECOND / "data" / "eval.txt"), txt_sample_by="paragraph") if model == "second" \
        else load_texts(data_file=str(Path(default_model_path()).parent / "default_data" / "eval.jsonl"))
    blocks = pack_blocks(tokenizer, texts, 64, max_blocks=4)
    cache_teacher(teacher, blocks, tmp_path / "cache", top_k=teacher.config.vocab_size)
    from datasets import load_from_disk

    cached = load_from_disk(str(tmp_path / "cache"))
    results = []
    for fused, data, with_teacher in ((True, blocks, True), (False, blocks, True), (False, cached, False)):
        s = copy.deepcopy(student).requires_grad_(True)
        args = SDFTConfig(output_dir=str(tmp_path / "x"), kd_fused=fused, kd_ratio=0.5, **cpu_args())
        trainer = SDFTTrainer(model=s, args=args, teacher_model=teacher if with_teacher else None, train_dataset=data)
        loss = trainer.compute_loss(s, pad(data.to_list()))
        loss.backward()
        results.append((loss.item(), s.lm_head.weight.grad.clone(), s.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for loss, *grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-4)
        for g, ref in zip(grads, results[0][1:]):
            torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-6)
