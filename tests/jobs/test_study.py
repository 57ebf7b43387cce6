"""The alignment study: its arms (head-kd leaves the decoder layers bit-identical, cka trains
on the CKA loss alone), its measurements, statistics and verdicts, and ``hf-sdft study`` end to end."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from hf_sdft.cka.metric import linear_cka
from hf_sdft.cli import main
from hf_sdft.data import as_batches
from hf_sdft.jobs.evaluation import held_out_sums, recovery_ratio
from hf_sdft.jobs.study import ARMS, StudyArguments, freeze_all_but_head
from hf_sdft.jobs.study_report import alignment_ratio, analyse
from hf_sdft.modeling import capture_layers
from hf_sdft.trainer.config import SDFTConfig
from tests.helpers import make_model, perturb, write_tiny_inputs
from tests.trainer.test_trainer import lm_dataset, sdft_trainer


def layer_outputs(model, batch):
    """Every decoder layer's output hidden states."""
    layers = list(range(len(model.model.layers)))
    with torch.no_grad(), capture_layers(model, layers) as hidden:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return [hidden[i] for i in layers]


def test_head_kd_leaves_decoder_layers_bit_identical(tmp_path, tokenizer, texts):
    teacher = make_model(layers=3, tie_word_embeddings=True)
    student = perturb(copy.deepcopy(teacher))
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied, as the embedded model is
    layers_before = copy.deepcopy(student.model.layers.state_dict())
    embed_before = student.model.embed_tokens.weight.detach().clone()
    head_before = student.lm_head.weight.detach().clone()
    trainable = freeze_all_but_head(student)
    assert sorted(trainable) == ["lm_head.weight", "model.norm.weight"]
    assert student.lm_head.weight is not student.model.embed_tokens.weight and not student.config.tie_word_embeddings
    batch = lm_dataset(tokenizer, texts[:8]).with_format("torch")[:]
    hidden_before = layer_outputs(student, batch)
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=6, learning_rate=1e-2)
    trainer.train()
    for name, value in student.model.layers.state_dict().items():
        assert torch.equal(value, layers_before[name]), name
    assert torch.equal(student.model.embed_tokens.weight, embed_before)
    for before, after in zip(hidden_before, layer_outputs(student, batch), strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(student.lm_head.weight, head_before)  # the head did train
    kd = [e["kd_loss"] for e in trainer.state.log_history if "kd_loss" in e]
    assert kd[-1] < kd[0]


def test_cka_arm_trains_on_the_cka_loss_alone(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=1, cka_weight=2.0,
                           output_loss_weight=0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    student.eval()  # outside a training step (no accumulation counter); dropout is 0 anyway
    loss = trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows = batch["attention_mask"].bool()
    with torch.no_grad():  # hidden_states[1] is decoder layer 0's output; the last layer's is only seen normed
        hs = student(**inputs, output_hidden_states=True).hidden_states[1]
        ht = teacher(**inputs, output_hidden_states=True).hidden_states[1]
    last_s, last_t = (layer_outputs(m, batch)[1] for m in (student, teacher))
    expected = 2.0 * (1 - (linear_cka(hs[rows], ht[rows]) + linear_cka(last_s[rows], last_t[rows])) / 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    student.zero_grad()
    loss.backward()
    assert student.lm_head.weight.grad is None or not student.lm_head.weight.grad.any()  # the head gets no signal
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    logged = trainer._sdft_metrics["eval"]
    assert logged["kd_loss"][-1] > 0 and logged["ce_loss"][-1] > 0  # still measured


def test_output_loss_weight_needs_something_to_train(tmp_path):
    with pytest.raises(ValueError, match="leave nothing to train: set cka_weight > 0"):
        SDFTConfig(output_dir=str(tmp_path), output_loss_weight=0.0)


def test_held_out_kl_matches_a_direct_computation(tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher), scale=0.3)
    batches = as_batches(lm_dataset(tokenizer, texts[:12]), 4)
    nll, count, kl = held_out_sums(student, batches, teacher).tolist()
    want_kl, want_nll, want_count = 0.0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            s = torch.log_softmax(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)
            t = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)
            keep = b["labels"][:, 1:] != -100  # padding: labels -100
            want_kl += (t.exp() * (t - s)).sum(-1)[keep].sum().item()
            want_nll -= s.gather(-1, b["input_ids"][:, 1:, None])[..., 0][keep].sum().item()
            want_count += int(keep.sum())
    assert count == want_count
    assert nll == pytest.approx(want_nll, rel=1e-5)
    assert kl == pytest.approx(want_kl, rel=1e-4) and kl > 0


class TestStudyArguments:
    def test_measure_steps_are_evenly_spaced_and_end_at_the_budget(self):
        assert StudyArguments(measure_points=4).measure_steps(60) == [15, 30, 45, 60]
        assert StudyArguments(measure_points=3).measure_steps(2) == [1, 2]

    @pytest.mark.parametrize("kw,msg", [
        ({"arms": "kd,distill"}, r"unknown arms \['distill'\]"), ({"arms": "kd,kd"}, "names an arm twice"),
        ({"seeds": "0,x"}, "give integers"), ({"arms": ""}, "arms is empty"), ({"measure_points": 0}, "at least 1"),
    ])
    def test_bad_values(self, kw, msg):
        with pytest.raises(ValueError, match=msg):
            StudyArguments(**kw)

    def test_budget_needed(self):
        with pytest.raises(ValueError, match="set max_steps"):
            StudyArguments().measure_steps(-1)


def synthetic_points(seeds=(0, 1, 2)):
    """A degraded start at ppl 30 / CKA 0.90 (teacher ppl 20) and, per seed, two steps of each arm:
    ce recovers while CKA falls; kd recovers and realigns; head-kd recovers with CKA exactly unchanged; cka realigns without recovery."""
    rng = np.random.default_rng(0)
    layers = lambda v: {"0": v - 0.01, "1": v + 0.01}  # noqa: E731
    points = [{"arm": "degraded", "seed": None, "step": 0, "ppl": 30.0, "kd": 0.5, "cka_mean": 0.90, "cka": layers(0.90)}]
    ends = {"ce": (24.0, 0.85, 0.4), "kd": (22.0, 0.97, 0.1), "head-kd": (25.0, 0.90, 0.3), "cka": (29.8, 0.96, 0.48), "kd+cka": (22.1, 0.98, 0.1)}
    for seed in seeds:
        for arm, (ppl, cka, kd) in ends.items():
            for step, frac in ((5, 0.5), (10, 1.0)):
                noise = rng.normal(0, 0.05)
                p = 30.0 + frac * (ppl - 30.0) + noise
                c = 0.90 if arm == "head-kd" else 0.90 + frac * (cka - 0.90) + noise / 100
                points.append({"arm": arm, "seed": seed, "step": step, "ppl": p, "kd": 0.5 + frac * (kd - 0.5),
                               "cka_mean": c, "cka": layers(c)})
    return points


def test_analysis_summaries_statistics_and_verdicts():
    points = synthetic_points()
    result = analyse(points, teacher_ppl=20.0, settings={}, resamples=200)
    finals = [p for p in points if p["arm"] == "head-kd" and p["step"] == 10]
    rs = [recovery_ratio(20.0, 30.0, p["ppl"]) for p in finals]
    head = result["arms"]["head-kd"]
    assert head["R"]["mean"] == pytest.approx(np.mean(rs)) and head["R"]["std"] == pytest.approx(np.std(rs, ddof=1))
    assert head["A"]["mean"] == 0.0
    cka_arm = [p for p in points if p["arm"] == "cka" and p["step"] == 10]
    assert result["arms"]["cka"]["A"]["mean"] == pytest.approx(np.mean([alignment_ratio(0.9, p["cka_mean"]) for p in cka_arm]))
    overall = result["statistics"]["all"]
    x, y = [p["cka_mean"] for p in points], [p["ppl"] for p in points]
    assert overall["spearman"]["value"] == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert overall["pearson"]["value"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic)
    low, high = overall["spearman"]["ci95"]
    assert low <= overall["spearman"]["value"] <= high
    assert result["statistics"]["natural_arms"]["n_points"] == 1 + 3 * 3 * 2  # degraded + ce, kd, kd+cka
    text = "\n- ".join(result["verdicts"])
    assert "head-kd recovered R = 0.50" in text and "recovery without realignment" in text
    assert "realignment without recovery: raising CKA is not sufficient" in text
    assert "ce recovered R = 0.60" in text and "while its CKA fell" in text and "- kd recovered" not in "- " + text
    final_cka = {a: np.mean([p["cka_mean"] for p in points if p["arm"] == a and p["step"] == 10]) for a in ("kd", "kd+cka")}
    assert f"The CKA regulariser on top of KD changed mean CKA by {final_cka['kd+cka'] - final_cka['kd']:+.3f}" in text


def test_study_command_end_to_end(tmp_path):
    root = write_tiny_inputs(tmp_path / "tiny")
    out = tmp_path / "study"
    main(["study", "--model_name_or_path", str(root / "model"), "--train_file", str(root / "train.txt"),
          "--eval_file", str(root / "eval.txt"), "--degradation", "prune", "--block_size", "32",
          "--max_steps", "4", "--measure_points", "2", "--seeds", "0,1", "--per_device_train_batch_size", "8",
          "--max_eval_blocks", "8", "--probe_blocks", "4", "--learning_rate", "3e-3", "--use_cpu", "true",
          "--disable_tqdm", "true", "--bootstrap_resamples", "100", "--study_dir", str(out)])
    result = json.loads((out / "study.json").read_text())
    points = result["points"]
    assert len(points) == 1 + 5 * 2 * 2  # degraded start, 5 arms × 2 seeds × 2 steps
    assert {(p["arm"], p["step"]) for p in points if p["arm"] != "degraded"} == {(a, s) for a in ARMS for s in (2, 4)}
    degraded = points[0]
    for p in points:
        assert set(p) == {"arm", "seed", "step", "ppl", "kd", "cka_mean", "cka"}
        assert math.isfinite(p["ppl"]) and 0 <= p["cka_mean"] <= 1 + 1e-6
        if p["arm"] == "head-kd":
            assert p["cka"] == degraded["cka"]  # the geometry is frozen: CKA exactly the degraded one
    ends = {a: [p for p in points if p["arm"] == a and p["step"] == 4] for a in ARMS}
    assert any(p["ppl"] != degraded["ppl"] for p in ends["head-kd"])  # but the outputs moved
    assert all(p["kd"] < degraded["kd"] for p in ends["kd"])
    report = (out / "study.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in report
    assert "## Verdicts" in report and "head-kd recovered" in report
    assert (out / "study_scatter.png").stat().st_size > 0 and (out / "study_layers.png").stat().st_size > 0
    assert result["statistics"]["all"]["n_points"] == len(points)
