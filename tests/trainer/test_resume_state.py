"""Issue 26 item 9: a resumed run restores everything an uninterrupted one carries on with: the
EMA teacher (not re-copied from the freshly degraded student) and the on-policy sampler's random
draws (not restarted from the seed). Train N steps saving at N/2, then resume from the N/2
checkpoint in a fresh trainer with a fresh copy of the start: the final weights must be equal."""

import copy

import pytest
import torch

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.data import pad
from tests.helpers import cpu_args, make_model, perturb
from tests.trainer.test_trainer import lm_dataset

SETTINGS = {
    # the EMA recipe's teacher (recipes/forgetting-demonstration.yaml: teacher_model_kind ema), CE mixed
    # in so that the student moves away from its EMA teacher
    "ema": dict(teacher_model_kind="ema", teacher_update_rate=0.25, kd_ratio=0.5),
    # the on-policy recipes (recipes/*onpolicy*.yaml): half of the batches sampled, reverse KL
    "on_policy": dict(on_policy_ratio=0.5, kd_loss="reverse_kl", max_new_tokens=4, prompt_length=5),
    "both": dict(teacher_model_kind="ema", teacher_update_rate=0.25, kd_ratio=0.5, on_policy_ratio=0.5,
                 max_new_tokens=4, prompt_length=5),
}
STEPS = 4


def train(out, start, teacher, dataset, tokenizer, settings, resume=None):
    student = copy.deepcopy(start).requires_grad_(True)
    args = SDFTConfig(output_dir=str(out), **cpu_args(
        per_device_train_batch_size=4, max_steps=STEPS, save_strategy="steps", save_steps=STEPS // 2,
        learning_rate=1e-2, **settings))
    trainer = SDFTTrainer(model=student, args=args, teacher_model=None if teacher is None else copy.deepcopy(teacher),
                          train_dataset=dataset, processing_class=tokenizer, data_collator=pad)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, tokenizer, texts, kind):
    settings = SETTINGS[kind]
    original = make_model()
    start = perturb(copy.deepcopy(original))
    teacher = None if settings.get("teacher_model_kind") == "ema" else original
    dataset = lm_dataset(tokenizer, texts)
    whole = train(tmp_path / "whole", start, teacher, dataset, tokenizer, settings)
    checkpoint = tmp_path / "whole" / f"checkpoint-{STEPS // 2}"
    assert checkpoint.is_dir()
    resumed = train(tmp_path / "resumed", start, teacher, dataset, tokenizer, settings, resume=str(checkpoint))
    assert resumed.state.global_step == whole.state.global_step == STEPS
    if settings.get("on_policy_ratio"):
        draws = [[e["on_policy/fraction"] for e in t.state.log_history if "on_policy/fraction" in e]
                 for t in (whole, resumed)]
        assert draws[0] == draws[1] and 0 < sum(draws[0]) < len(draws[0])  # the same batches were sampled
    assert not torch.equal(weights(start), weights(whole.model))  # it trained
    assert torch.equal(weights(whole.model), weights(resumed.model))
    if settings.get("teacher_model_kind") == "ema":
        assert torch.equal(weights(whole.teacher_model), weights(resumed.teacher_model))


def test_recovery_job_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """The job end to end (on-policy batches and an EMA teacher, as the recipes set them): the
    checkpoint at step 2 of a 4-step run, copied into a fresh folder and resumed by a new job (a
    freshly degraded student), ends with the uninterrupted run's saved weights."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from hf_sdft.jobs.outputs import FINGERPRINT_FILE
    from tests.helpers import write_tiny_inputs
    from tests.jobs.test_recover import recover

    tiny = write_tiny_inputs(tmp_path / "tiny")
    flags = ["--degradation", "prune", "--max_steps", "4", "--save_steps", "2", "--on_policy_ratio", "0.5",
             "--max_new_tokens", "4", "--prompt_length", "8", "--kd_loss", "reverse_kl", "--teacher_model_kind", "ema",
             "--kd_ratio", "0.5", "--learning_rate", "1e-2", "--keep_best_model", "false"]
    recover(tiny, tmp_path / "whole", *flags)
    # the folder a run killed after its step-2 checkpoint leaves: its fingerprint, not complete
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    fingerprint = json.loads((tmp_path / "whole" / FINGERPRINT_FILE).read_text())
    (tmp_path / "resumed" / FINGERPRINT_FILE).write_text(json.dumps(fingerprint | {"complete": False}))
    stats, _ = recover(tiny, tmp_path / "resumed", *flags)
    assert stats["recovery"]["steps"] == 4
    whole, resumed = (AutoModelForCausalLM.from_pretrained(tmp_path / f) for f in ("whole", "resumed"))
    assert torch.equal(weights(whole), weights(resumed))
