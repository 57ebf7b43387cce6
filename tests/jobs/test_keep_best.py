"""Issue 26 item 10: the recovery job never hands back a model worse than the one it was given.
Held-out perplexity is measured at step 0 and at each evaluation; the best state, the degraded
start included, is the one saved (masks and quantization grids intact)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_sdft.compress.prune import masks_from_zeros
from hf_sdft.compress.quantize import load_quantized
from hf_sdft.jobs.cards import STATS_FILE
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.jobs.recovery_data import load_recovery_data
from hf_sdft.jobs.stats import format_table
from tests.helpers import make_tokenizer, write_tiny_inputs
from tests.jobs.test_recover import recover


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_inputs(tmp_path_factory.mktemp("tiny"))


def held_out(tiny):
    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    return load_recovery_data(rec, make_tokenizer(), default_model=False).eval.batches


# a learning rate that wrecks the student: every step after the start is worse on held-out text
RUIN = ["--learning_rate", "0.5", "--warmup_steps", "0", "--max_steps", "4", "--save_steps", "2"]


def test_a_start_already_at_the_teachers_perplexity_is_not_made_worse(tiny, tmp_path):
    """int8 barely changes the tiny model: the start is at the teacher's perplexity, training at a
    ruinous learning rate only makes it worse, so the start (step 0) is what must be saved."""
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int8", "--quant_group_size", "channel", *RUIN)
    ppl = stats["perplexity"]
    assert ppl["degraded"] == pytest.approx(ppl["teacher"], rel=2e-2)
    # measured independently on the saved quanto folder: not worse than the start
    saved = perplexity(load_quantized(tmp_path), held_out(tiny))
    assert saved <= ppl["degraded"] * (1 + 1e-6)
    assert saved == pytest.approx(ppl["recovered"], rel=1e-6)
    kept = stats["kept"]
    assert kept["step"] == 0 and kept["restored"] and kept["last_step"] == 4
    history = {h["step"]: h["perplexity"] for h in kept["history"]}
    assert set(history) == {0, 2, 4} and history[0] == pytest.approx(ppl["degraded"], rel=1e-6)
    assert min(history[2], history[4]) > history[0]  # training did make it worse: the test can tell
    assert "step 0 of 4" in format_table(stats)
    assert json.loads((tmp_path / STATS_FILE).read_text())["kept"]["step"] == 0
    assert "Kept state: **step 0** of 4" in (tmp_path / "README.md").read_text()
    assert not (tmp_path / "best_state").exists()


def test_a_pruned_start_kept_keeps_its_zeros_and_weights(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--prune_method", "magnitude", *RUIN,
                       "--eval_every_n_steps", "1")
    degraded = AutoModelForCausalLM.from_pretrained(tiny / "model")
    from hf_sdft.compress.prune import prune

    masks = prune(degraded, 0.5, "unstructured", "magnitude", None)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert stats["kept"]["step"] == 0 and [h["step"] for h in stats["kept"]["history"]] == [0, 1, 2, 3, 4]
    found = masks_from_zeros(saved)
    assert found.keys() == masks.keys() and all(torch.equal(found[n], m) for n, m in masks.items())
    for (name, p), q in zip(saved.state_dict().items(), degraded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # exactly the degraded start
    assert perplexity(saved, held_out(tiny)) == pytest.approx(stats["perplexity"]["degraded"], rel=1e-6)


def test_the_last_state_is_kept_when_it_is_best(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--learning_rate", "1e-2")
    kept = stats["kept"]
    assert kept["step"] == 8 and not kept["restored"]
    assert kept["perplexity"] == pytest.approx(stats["perplexity"]["recovered"], rel=1e-9)
    assert stats["perplexity"]["recovered"] < stats["perplexity"]["degraded"]


def test_early_stopping_stops_after_patience(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int8", "--quant_group_size", "channel", *RUIN,
                       "--max_steps", "8", "--eval_every_n_steps", "1", "--early_stopping_patience", "2")
    kept = stats["kept"]
    assert kept["early_stopped_at"] == 2 and kept["step"] == 0 and stats["recovery"]["steps"] == 2


def test_keep_best_model_off_hands_back_the_last_state(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int8", "--quant_group_size", "channel", *RUIN,
                       "--keep_best_model", "false")
    assert stats["kept"]["step"] == 0 and not stats["kept"]["restored"]  # reported, not applied
    assert stats["perplexity"]["recovered"] > stats["perplexity"]["degraded"]


@pytest.mark.parametrize("flag", ["--eval_every_n_steps", "--early_stopping_patience"])
def test_bad_periods_are_refused(flag):
    from hf_sdft.cli import _recipe_parser

    with pytest.raises(ValueError, match=f"{flag[2:]}=0 must be at least 1"):
        _recipe_parser().parse_args_and_config([flag, "0"])


def test_a_lora_student_kept_at_its_start_merges_to_the_degraded_weights(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--use_peft", "true", "--lora_r", "4",
                       "--lora_target_modules", "q_proj", "v_proj", *RUIN, "--learning_rate", "50")
    from hf_sdft.compress.prune import prune

    degraded = AutoModelForCausalLM.from_pretrained(tiny / "model")
    prune(degraded, 0.5, "unstructured", "magnitude", None)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert stats["kept"]["step"] == 0 and stats["kept"]["restored"]
    for (name, p), q in zip(saved.state_dict().items(), degraded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # the adapters restored to their start (B = 0): nothing merged in


def test_a_crash_while_saving_still_hands_back_the_kept_state(tiny, tmp_path, monkeypatch):
    """Training finished, then saving failed: the re-run loads the last checkpoint without training
    again, and must still hand back the kept state (here the start), not the last step's."""
    import hf_sdft.jobs.recover as job

    def crash(*args, **kwargs):
        raise OSError("disk full")

    flags = ("--quant_weights", "int8", "--quant_group_size", "channel", *RUIN)
    monkeypatch.setattr(job, "write_card", crash)
    with pytest.raises(OSError, match="disk full"):
        recover(tiny, tmp_path, *flags)
    monkeypatch.undo()
    stats, _ = recover(tiny, tmp_path, *flags)
    assert stats["kept"]["step"] == 0 and stats["kept"]["restored"] and stats["recovery"]["steps"] == 4
    saved = perplexity(load_quantized(tmp_path), held_out(tiny))
    assert saved == pytest.approx(stats["perplexity"]["degraded"], rel=1e-6)
    assert not (tmp_path / "best_state").exists()
