"""Block-wise reconstruction (hf_sdft.compress.reconstruct): each block gets closer to the
teacher's, one block trains at a time, the targets are the teacher's own block outputs, pruned
and quantized students keep their invariants, and the recovery job runs it as an option."""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer

from hf_sdft.compress.prune import prune
from hf_sdft.compress.quantize import load_quantized, quantize_student, save_quantized
from hf_sdft.compress.reconstruct import reconstruct_blocks, teacher_outputs
from hf_sdft.jobs.cards import STATS_FILE
from hf_sdft.jobs.stats import format_table
from hf_sdft.modeling import capture_layers
from tests.helpers import make_model, make_texts, make_tokenizer, perturb
from tests.jobs.test_recover import recover, tiny  # noqa: F401  (the tiny job's fixture)


def batches(n: int = 12, size: int = 4, seed: int = 3) -> list[dict]:
    tok, texts = make_tokenizer(), make_texts(n, seed=seed)
    out = []
    for i in range(0, n, size):
        enc = tok(texts[i:i + size], padding=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_each_block_gets_closer_and_perplexity_improves_on_the_embedded_model():
    """int2 per-row student of the embedded (trained) 1.1M model: every block's error to the
    teacher's output falls, and the held-out perplexity and KL to the teacher fall too
    (measured: 71.7 → 49.3 ppl, teacher 26.9, in 20 steps a block)."""
    from hf_sdft.data import default_model_path
    from hf_sdft.jobs.config import RecoveryArguments
    from hf_sdft.jobs.evaluation import held_out_sums
    from hf_sdft.jobs.recovery_data import load_recovery_data
    from hf_sdft.modeling import from_pretrained

    path = default_model_path()
    teacher = from_pretrained(path, dtype=torch.float32).eval()
    data = load_recovery_data(RecoveryArguments(max_eval_blocks=16, block_size=128),
                              AutoTokenizer.from_pretrained(path), default_model=True)
    student = quantize_student(copy.deepcopy(teacher), "int2")
    before = held_out_sums(student, data.eval.batches, teacher)
    report = reconstruct_blocks(student, teacher, data.calibration(8), steps=20, lr=1e-3, progress=False)
    after = held_out_sums(student, data.eval.batches, teacher)
    assert len(report["mse_before"]) == len(report["mse_after"]) == 4
    for b, a in zip(report["mse_before"], report["mse_after"]):
        assert a < 0.8 * b
    ppl_before, ppl_after = (float(torch.exp(x[0] / x[1])) for x in (before, after))
    assert ppl_after < 0.8 * ppl_before  # held-out perplexity: 71.7 → 49.3
    assert after[2] < 0.9 * before[2]  # KL(teacher ‖ student) on held-out data
    assert torch.equal(after[1], before[1])


def test_only_the_current_block_trains(monkeypatch):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher), 0.3)
    frozen_teacher = {n: p.clone() for n, p in teacher.state_dict().items()}
    names = {id(p): n for n, p in student.named_parameters()}
    changed_per_optimizer: list[set[str]] = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            changed_per_optimizer.append(set())

        def step(self, closure=None):
            snapshot = {n: p.detach().clone() for n, p in student.named_parameters()}
            result = super().step(closure)
            changed_per_optimizer[-1].update(n for n, p in student.named_parameters() if not torch.equal(p, snapshot[n]))
            return result

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    grads = {n: p.requires_grad for n, p in student.named_parameters()}
    reconstruct_blocks(student, teacher, batches(), steps=3, lr=1e-2, progress=False)
    assert len(changed_per_optimizer) == 2
    for i, changed in enumerate(changed_per_optimizer):
        block = {n for n in names.values() if n.startswith(f"model.layers.{i}.")}
        assert changed and changed <= block, (i, changed - block)
        assert len(changed) == len(block)  # every parameter of the block trains (norms included)
    assert all(torch.equal(p, frozen_teacher[n]) for n, p in teacher.state_dict().items())
    assert {n: p.requires_grad for n, p in student.named_parameters()} == grads


def mixed_attention_model():
    """A Qwen3 whose blocks alternate full and sliding-window attention: each block gets its own mask."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_sliding_window=True, sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "full_attention"], pad_token_id=0))


@pytest.mark.parametrize("build", [lambda: make_model(layers=3), mixed_attention_model], ids=["llama", "mixed"])
def test_teacher_targets_are_its_block_outputs_in_a_full_forward(build):
    teacher = build().eval()
    data = batches()
    walked = list(teacher_outputs(teacher, data))
    assert len(walked) == 3
    for j, batch in enumerate(data):
        with capture_layers(teacher, [0, 1, 2]) as captured, torch.no_grad():
            teacher(**batch)
        for i in range(3):
            torch.testing.assert_close(walked[i][j], captured[i], rtol=0, atol=1e-6)


def test_pruned_student_keeps_its_masks_exactly():
    teacher = make_model()
    student = copy.deepcopy(teacher)
    masks = prune(student, sparsity=0.5)
    weights = {n: student.get_submodule(n).weight.detach().clone() for n in masks}
    report = reconstruct_blocks(student, teacher, batches(), steps=5, lr=1e-2, masks=masks, progress=False)
    assert report["mse_after"][0] < report["mse_before"][0]
    moved = 0
    for name, mask in masks.items():
        weight = student.get_submodule(name).weight
        assert bool((weight[~mask] == 0).all())  # every pruned weight still exactly zero
        moved += not torch.equal(weight, weights[name])
    assert moved > 0


@pytest.mark.parametrize("learn_scales", [False, True])
def test_quantized_student_saves_and_reloads_identically(tmp_path, learn_scales):
    teacher = make_model()
    student = quantize_student(copy.deepcopy(teacher), "int2", learn_scales=learn_scales)
    scale = student.model.layers[0].mlp.up_proj.weight_scale
    scale = None if scale is None else scale.detach().clone()
    report = reconstruct_blocks(student, teacher, batches(), steps=10, lr=1e-2, progress=False)
    assert all(a < b for a, b in zip(report["mse_after"], report["mse_before"]))
    if learn_scales:
        assert not torch.equal(student.model.layers[0].mlp.up_proj.weight_scale, scale)
    save_quantized(student, tmp_path)
    batch = batches()[0]
    assert torch.equal(logits(student.eval(), batch), logits(load_quantized(tmp_path), batch))


def test_refuses_peft_students_and_quantized_activations():
    from peft import LoraConfig, get_peft_model

    teacher = make_model()
    wrapped = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT"):
        reconstruct_blocks(wrapped, teacher, batches(), steps=1)
    quantized = quantize_student(copy.deepcopy(teacher), "int8", activations="int8", calibration=batches())
    with pytest.raises(ValueError, match="quanto layers"):
        reconstruct_blocks(quantized, teacher, batches(), steps=1)


def test_recovery_job_runs_the_phase_and_skips_it_on_resume(tiny, tmp_path):  # noqa: F811
    flags = ("--quant_weights", "int2", "--quant_group_size", "channel", "--block_reconstruction", "true",
             "--block_reconstruction_steps", "4", "--block_reconstruction_lr", "3e-3", "--calibration_blocks", "8")
    stats, _ = recover(tiny, tmp_path, *flags, "--max_steps", "4")
    saved = json.loads((tmp_path / STATS_FILE).read_text())
    blocks = saved["block_reconstruction"]
    assert blocks["ran"] is True and blocks["steps"] == 4 and blocks["calibration_blocks"] == 8
    assert len(blocks["mse_before"]) == len(blocks["mse_after"]) == 2
    assert all(a < b for a, b in zip(blocks["mse_after"], blocks["mse_before"]))
    ppl = saved["perplexity"]
    assert f"after block reconstruction  {ppl['after_blocks']:.3f}" in format_table(saved)
    assert ppl["after_blocks"] != ppl["degraded"] and "mean_after_blocks" in saved["cka"]
    # a longer run resumed from the first one's checkpoint (explicitly: its settings differ)
    resumed, _ = recover(tiny, tmp_path / "longer", *flags, "--max_steps", "8",
                         "--resume_from_checkpoint", str(tmp_path / "checkpoint-4"))
    assert resumed["block_reconstruction"] == {"ran": False, "skipped": "resumed from checkpoint-4"}
    assert "after_blocks" not in resumed["perplexity"] and resumed["recovery"]["steps"] == 8


def test_off_by_default_and_refused_where_it_cannot_run(tiny, tmp_path):  # noqa: F811
    from hf_sdft.jobs.config import RecoveryArguments

    assert RecoveryArguments().block_reconstruction is False
    with pytest.raises(ValueError, match="forgetting_mode prevent"):
        RecoveryArguments(degradation="forgetting", forgetting_mode="prevent", block_reconstruction=True)
    with pytest.raises(ValueError, match="weight-only"):
        RecoveryArguments(quant_activations="int8", block_reconstruction=True)


def test_pruned_recovery_job_keeps_exact_sparsity_through_the_phase(tiny, tmp_path, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    import hf_sdft.jobs.recover as job
    from hf_sdft.compress.prune import masks_from_zeros

    original = AutoModelForCausalLM.from_pretrained(tiny / "model")
    masks = prune(copy.deepcopy(original), sparsity=0.5)  # the job's magnitude masks, made here too
    seen = {}
    real_train = job.train

    def train(student, *args):  # the student as the phase left it (training re-applies masks itself)
        seen["phase"] = masks_from_zeros(student.model)
        return real_train(student, *args)

    monkeypatch.setattr(job, "train", train)
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--block_reconstruction", "true",
                       "--block_reconstruction_steps", "4", "--block_reconstruction_lr", "1e-2", "--max_steps", "2")
    assert stats["block_reconstruction"]["ran"] is True
    saved = masks_from_zeros(AutoModelForCausalLM.from_pretrained(tmp_path))
    for name, mask in masks.items():
        assert torch.equal(seen["phase"][name], mask), name
        assert torch.equal(saved[name], mask), name
