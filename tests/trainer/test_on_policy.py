"""On-policy batches and the demonstration-conditioned teacher: prompt extraction, the sampled-token
mask, exact position alignment between the student's and the teacher's contexts, λ = 0 equal to
the off-policy trainer, the EMA teacher, and real training runs."""

import copy

import pytest
import torch
from datasets import Dataset

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.data import TEACHER_PROMPT, pad, teacher_prompt_ids, tokenize_examples
from hf_sdft.trainer.on_policy import on_policy_batch, prompt_lengths
from tests.helpers import cpu_args, make_model, perturb
from tests.trainer.test_trainer import lm_dataset

TEMPLATE = "{prompt}\n\n{privileged_context}"


def qa_examples(n=24):
    words = ["the lord", "david", "the city", "his people", "them"]
    return [{"prompt": f"who went to {words[i % 5]}? ", "completion": f"{words[(i + 1) % 5]} went."} for i in range(n)]


def trainer_for(tmp_path, student, teacher, dataset, tokenizer, **kw):
    args = SDFTConfig(output_dir=str(tmp_path), **cpu_args(**{"per_device_train_batch_size": 4, "max_new_tokens": 6,
                                                               "prompt_length": 5, **kw}))
    return SDFTTrainer(model=student, args=args, teacher_model=teacher, train_dataset=dataset,
                       processing_class=tokenizer, data_collator=pad)


def test_prompt_lengths_of_chat_and_text_rows():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [4, 5, 6, 7, 8], [3, 4, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    # chat row: before the first label; text rows: prompt_length, leaving one token
    assert prompt_lengths(labels, mask, prompt_length=3) == [2, 3, 1]


def test_batch_layout_puts_samples_at_the_same_positions():
    student_prompts, teacher_prompts = [[5, 6], [7, 8, 9]], [[1, 2, 3, 5, 6], [7, 8, 9]]
    samples = [[10, 11, 12], [13]]
    b = on_policy_batch(student_prompts, teacher_prompts, samples, pad_id=0)
    width = 5
    assert b["input_ids"].shape == b["teacher_input_ids"].shape == (2, width + 3)
    for i, (ps, pt, s) in enumerate(zip(student_prompts, teacher_prompts, samples, strict=True)):
        for prefix, prompt in (("", ps), ("teacher_", pt)):
            ids, mask, pos = (b[f"{prefix}{k}"][i].tolist() for k in ("input_ids", "attention_mask", "position_ids"))
            real = [t for t, m in zip(ids, mask, strict=True) if m]
            assert real == prompt + s
            assert [p for p, m in zip(pos, mask, strict=True) if m] == list(range(len(prompt) + len(s)))
            assert ids[width:width + len(s)] == s
        assert b["labels"][i].tolist() == [-100] * width + s + [-100] * (3 - len(s))


def test_demonstration_alignment_is_exact(tokenizer):
    """Logits at the sampled positions of the padded batch equal those of each sequence run alone."""
    model = make_model()
    student_prompts, teacher_prompts = [[5, 6], [7, 8, 9, 4]], [[1, 2, 3, 5, 6, 4], [7, 8, 9, 4]]
    samples = [[10, 11, 12], [13, 14]]
    b = on_policy_batch(student_prompts, teacher_prompts, samples, pad_id=0)
    with torch.no_grad():
        for prefix, prompts in (("", student_prompts), ("teacher_", teacher_prompts)):
            logits = model(input_ids=b[f"{prefix}input_ids"], attention_mask=b[f"{prefix}attention_mask"],
                           position_ids=b[f"{prefix}position_ids"]).logits
            for i, (prompt, s) in enumerate(zip(prompts, samples, strict=True)):
                alone = model(input_ids=torch.tensor([prompt + s])).logits[0]
                # logits predicting sample token j: alone at len(prompt) − 1 + j, batched at W − 1 + j
                got = logits[i, 6 - 1:6 - 1 + len(s)]
                want = alone[len(prompt) - 1:len(prompt) - 1 + len(s)]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_on_policy_kd_is_over_the_sampled_tokens_only(tmp_path, tokenizer):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    texts = ["the lord said unto them and it came to pass."] * 8
    trainer = trainer_for(tmp_path, student, teacher, lm_dataset(tokenizer, texts), tokenizer, on_policy_ratio=1.0,
                          max_steps=1)
    inputs = pad([dict(r) for r in lm_dataset(tokenizer, texts).select(range(4))])
    torch.manual_seed(0)
    batch, figures = trainer.on_policy.batch(student, inputs)
    assert figures["gen_tokens"] == float((batch["labels"] != -100).sum())
    student.eval()
    trainer.compute_loss(student, dict(batch))
    got = trainer._sdft_metrics["eval"]["kd_loss"][-1].item()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(4):
            keep = batch["attention_mask"][i].bool()
            seq = batch["input_ids"][i][keep][None]
            sampled = int((batch["labels"][i] != -100).sum())
            s = torch.log_softmax(student(input_ids=seq).logits[0, -sampled - 1:-1].double(), -1)
            t = torch.log_softmax(teacher(input_ids=seq).logits[0, -sampled - 1:-1].double(), -1)
            total += (t.exp() * (t - s)).sum().item()
            count += sampled
    assert got == pytest.approx(total / count, rel=1e-4)


def test_ratio_zero_is_the_off_policy_trainer_bit_for_bit(tmp_path, tokenizer, texts):
    teacher = make_model()
    weights = []
    for i, extra in enumerate(({}, {"on_policy_ratio": 0.0, "max_new_tokens": 3, "generation_temperature": 0.5})):
        student = perturb(copy.deepcopy(teacher)).requires_grad_(True)  # the first run froze the teacher
        torch.manual_seed(123)
        trainer_for(tmp_path / str(i), student, teacher, lm_dataset(tokenizer, texts), tokenizer, max_steps=3,
                    **extra).train()
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_on_policy_training_logs_generation_and_lowers_kd(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    trainer = trainer_for(tmp_path, student, teacher, lm_dataset(tokenizer, texts), tokenizer, on_policy_ratio=0.5,
                          max_steps=8, learning_rate=5e-3, gradient_accumulation_steps=2, logging_steps=4,
                          kd_loss="reverse_kl")
    trainer.train()
    logs = [e for e in trainer.state.log_history if "on_policy/fraction" in e]
    fractions = [e["on_policy/fraction"] for e in logs]
    assert 0 < sum(fractions) / len(fractions) < 1
    assert all(e["on_policy/gen_tokens"] > 0 and e["on_policy/gen_seconds"] > 0 for e in logs if "on_policy/gen_tokens" in e)


def test_demonstration_teacher_prompt_holds_the_reference(tokenizer):
    example = {"prompt": "who went? ", "completion": "david went."}
    ids = teacher_prompt_ids(tokenizer, example, TEMPLATE)
    assert ids == tokenizer("who went? \n\ndavid went.")["input_ids"]
    with_context = teacher_prompt_ids(tokenizer, {**example, "privileged_context": "the city"}, TEMPLATE)
    assert with_context == tokenizer("who went? \n\nthe city")["input_ids"]
    rows = tokenize_examples(tokenizer, Dataset.from_list([example]), 64, teacher_template=TEMPLATE)
    assert rows[0][TEACHER_PROMPT] == ids


def test_demonstration_training_runs_and_needs_its_column(tmp_path, tokenizer):
    teacher = make_model()
    student = copy.deepcopy(teacher).requires_grad_(True)
    data = tokenize_examples(tokenizer, Dataset.from_list(qa_examples()), 64, teacher_template=TEMPLATE)
    trainer = trainer_for(tmp_path, student, teacher, data, tokenizer, on_policy_ratio=1.0,
                          teacher_context="demonstration", max_steps=3)
    trainer.train()
    assert [e["on_policy/fraction"] for e in trainer.state.log_history if "on_policy/fraction" in e] == [1.0] * 3
    with pytest.raises(ValueError, match="needs the teacher's prompt of each example"):
        trainer_for(tmp_path, student, teacher, data.remove_columns(TEACHER_PROMPT), tokenizer, on_policy_ratio=1.0,
                    teacher_context="demonstration")
    with pytest.raises(ValueError, match="set on_policy_ratio > 0"):
        SDFTConfig(output_dir=str(tmp_path), teacher_context="demonstration")


def test_ema_teacher_follows_the_student(tmp_path, tokenizer, texts):
    student = perturb(make_model())
    start = [p.detach().clone() for p in student.parameters()]
    trainer = trainer_for(tmp_path, student, None, lm_dataset(tokenizer, texts), tokenizer, teacher_model_kind="ema",
                          teacher_update_rate=0.25, max_steps=1, learning_rate=1e-2, kd_ratio=0.5)
    trainer.train()
    for t, s, s0 in zip(trainer.teacher_model.parameters(), student.parameters(), start, strict=True):
        torch.testing.assert_close(t, 0.75 * s0 + 0.25 * s.detach())
    assert any(not torch.equal(s0, s) for s0, s in zip(start, student.parameters(), strict=True))
