"""The generation-based recipes end to end on the embedded model with its small-model settings:
on-policy recovery (plain text, and a quanto int2 student), the demonstration-conditioned teacher
and rewriting (chat)."""

import json

import pytest

from hf_sdft.cli import _recipe_parser
from hf_sdft.data import default_data_file
from hf_sdft.jobs.recover import run_recovery

SMALL = ["--block_size", "128", "--learning_rate", "1e-3", "--forgetting_learning_rate", "1e-3",
         "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--bf16", "false",
         "--gradient_checkpointing", "false", "--max_steps", "4", "--forgetting_steps", "6", "--max_eval_blocks", "16",
         "--probe_blocks", "4", "--disable_tqdm", "true", "--save_strategy", "no", "--use_cpu", "true",
         "--max_new_tokens", "16", "--prompt_length", "32", "--logging_steps", "1"]


def run(recipe, tmp_path, *extra):
    rec, args, model_args = _recipe_parser().parse_args_and_config(
        ["--config", f"recipes/{recipe}.yaml", *SMALL, "--output_dir", str(tmp_path), *extra])
    return run_recovery(rec, args, model_args), json.loads((tmp_path / "trainer_state.json").read_text())


def on_policy_logs(state):
    return [e for e in state["log_history"] if "on_policy/fraction" in e]


@pytest.mark.parametrize("recipe", ["forgetting-onpolicy", "quanto-int2-onpolicy"])
def test_on_policy_recovery_recipes(tmp_path, recipe):
    stats, state = run(recipe, tmp_path)
    logs = on_policy_logs(state)
    assert logs and all(0 <= e["on_policy/fraction"] <= 1 for e in logs)
    assert any(e.get("on_policy/gen_tokens", 0) > 0 for e in logs)  # some batches were sampled
    assert stats["recovery"]["steps"] == 4 and stats["recovery"]["train_seconds"] > 0
    assert stats["perplexity"]["recovered"] < stats["perplexity"]["degraded"] * 1.5
    assert stats["recovery"]["generation"] | {"on_policy_ratio": 0.5, "max_new_tokens": 16, "teacher_context": "prompt"} \
        == stats["recovery"]["generation"]
    assert "| on-policy batches | λ = 0.5: 16 tokens sampled" in (tmp_path / "README.md").read_text()


def test_demonstration_recipe_trains_on_its_own_samples(tmp_path, monkeypatch):
    import hf_sdft.jobs.sft as training

    trainers = []
    make = training.make_trainer
    monkeypatch.setattr(training, "make_trainer", lambda *a, **k: trainers.append(make(*a, **k)) or trainers[-1])
    narrow = tmp_path / "narrow.jsonl"  # a small narrow set keeps the one-run budget short
    narrow.write_text("".join(open(default_data_file("narrow_chat_train")).readlines()[:64]))
    rec, args, model_args = _recipe_parser().parse_args_and_config(
        ["--config", "recipes/forgetting-demonstration.yaml", *SMALL, "--output_dir", str(tmp_path / "out"),
         "--narrow_train_file", str(narrow), "--forgetting_steps", "4"])
    assert args.teacher_context == "demonstration" and args.on_policy_ratio == 1.0
    stats = run_recovery(rec, args, model_args)
    assert set(stats["narrow_perplexity"]) == {"teacher", "degraded", "recovered"}
    plain_sft, demonstration = trainers  # the plain-SFT comparison, then the one demonstration run
    assert demonstration.args.teacher_context == "demonstration"
    logs = on_policy_logs({"log_history": demonstration.state.log_history})
    assert [e["on_policy/fraction"] for e in logs] == [1.0] * 4 and all(e["on_policy/gen_tokens"] > 0 for e in logs)
    # each step moves the student: its narrow-task perplexity is no longer the original's
    assert stats["narrow_perplexity"]["recovered"] != stats["narrow_perplexity"]["teacher"]
