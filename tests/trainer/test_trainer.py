"""Real (tiny) training runs with SDFTTrainer / SDFTSFTTrainer and the CKA callback."""

import copy
import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from hf_sdft import CKACallback, SDFTConfig, SDFTSFTConfig, SDFTSFTTrainer, SDFTTrainer, cka_history
from hf_sdft.cka.metric import linear_cka
from tests.helpers import cpu_args, make_model, make_texts, perturb


def lm_dataset(tokenizer, texts, width=24):
    rows = []
    for t in texts:
        ids = tokenizer(t)["input_ids"][:width]
        pad = width - len(ids)
        rows.append({
            "input_ids": ids + [0] * pad,
            "attention_mask": [1] * len(ids) + [0] * pad,
            "labels": ids + [-100] * pad,
        })
    return Dataset.from_list(rows)


def sdft_trainer(tmp_path, student, teacher, tokenizer, texts, callbacks=(), **kw):
    args = SDFTConfig(output_dir=str(tmp_path), **cpu_args(**{"per_device_train_batch_size": 8, **kw}))
    return SDFTTrainer(
        model=student, args=args, teacher_model=teacher, train_dataset=lm_dataset(tokenizer, texts),
        processing_class=tokenizer, callbacks=list(callbacks),
    )


def logged(trainer, key):
    return [e[key] for e in trainer.state.log_history if key in e]


def test_exact_copy_has_zero_kd_and_unit_cka(tmp_path, tokenizer, texts):
    student = make_model()
    cb = CKACallback(texts[:16], every_n_steps=2)
    trainer = sdft_trainer(tmp_path, student, copy.deepcopy(student), tokenizer, texts, [cb], max_steps=2,
                           learning_rate=0.0, cka_weight=1.0)
    trainer.train()
    assert all(v < 1e-6 for v in logged(trainer, "kd_loss"))
    assert all(v < 1e-6 for v in logged(trainer, "cka_loss"))
    assert logged(trainer, "cka/mean")[0] == pytest.approx(1.0, abs=1e-6)
    assert logged(trainer, "cka/layer_1")[0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("cka_weight", [0.0, 0.5])
def test_perturbed_student_recovers(tmp_path, tokenizer, texts, cka_weight):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    cb = CKACallback(texts[:16], every_n_steps=10)
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, [cb], max_steps=30, learning_rate=3e-3,
                           cka_weight=cka_weight, kd_loss="jsd", kd_beta=0.5, kd_ratio=0.9)
    trainer.train()
    kd = logged(trainer, "kd_loss")
    assert kd[-1] < 0.5 * kd[0]
    history = cka_history(trainer.state.log_history)
    assert [h["step"] for h in history] == [0, 10, 20, 30]
    assert history[-1]["mean"] > history[0]["mean"]
    first_loss_log = next(e for e in trainer.state.log_history if "loss" in e)
    assert ("cka_loss" in first_loss_log) == (cka_weight > 0)
    assert "ce_loss" in first_loss_log


def test_sft_trainer_recovers_and_keeps_trl_features(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    args = SDFTSFTConfig(
        output_dir=str(tmp_path), **cpu_args(per_device_train_batch_size=8, max_steps=25, learning_rate=3e-3,
                                             gradient_checkpointing=False, max_length=32),
        cka_weight=0.2, cka_layers="0,1",
    )
    trainer = SDFTSFTTrainer(
        model=student, args=args, teacher_model=teacher, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}), callbacks=[CKACallback(texts[:8], every_n_steps=25)],
    )
    trainer.train()
    kd = logged(trainer, "kd_loss")
    assert kd[-1] < 0.5 * kd[0]
    assert trainer.cka_loss_layers == [0, 1]
    assert "sft" in trainer._tag_names and "hf-sdft" in trainer._tag_names


def test_peft_student_uses_base_as_teacher(tmp_path, tokenizer, texts):
    base = make_model()
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = sdft_trainer(tmp_path, student, None, tokenizer, texts, max_steps=1, learning_rate=0.0)
    trainer.train()
    assert logged(trainer, "kd_loss")[0] < 1e-6  # LoRA starts as the identity: student == base
    with torch.no_grad():  # make the adapters matter: now the student differs from its base
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trainer2 = sdft_trainer(tmp_path, student, None, tokenizer, texts, max_steps=1, learning_rate=0.0)
    trainer2.train()
    assert logged(trainer2, "kd_loss")[0] > 1e-3


def test_gradient_accumulation_matches_full_batch(tmp_path, tokenizer):
    """One SGD step with 4×1 and 2×2 (accumulated) batches moves the weights identically."""
    texts = make_texts(4, seed=5)  # different lengths: token-weighting matters
    weights = []
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        teacher = make_model(seed=3)
        student = perturb(copy.deepcopy(teacher))
        trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=1, learning_rate=0.5,
                               optim="sgd", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                               kd_ratio=0.7, lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer.train()
        weights.append(student.model.layers[0].mlp.up_proj.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[0], weights[2], rtol=1e-5, atol=1e-6)


def direct_cakld_gamma(teacher, dataset, rows=None):
    """BitDistiller's γ written out: per sequence, the mean teacher probability of its next-token
    labels; then the mean over sequences (float64)."""
    means = []
    for i in rows if rows is not None else range(len(dataset)):
        row = dataset[i]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([row["input_ids"]]),
                             attention_mask=torch.tensor([row["attention_mask"]])).logits[0, :-1].double()
        labels = torch.tensor(row["labels"][1:])
        keep = labels != -100
        means.append(torch.softmax(logits, -1)[keep, labels[keep]].mean().item())
    return sum(means) / len(means)


def test_cakld_trains_and_logs_the_teachers_gamma(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=20, learning_rate=3e-3,
                           kd_loss="cakld", kd_ratio=0.9)
    state = torch.get_rng_state()
    gamma = trainer.estimate_cakld_gamma()
    assert torch.equal(torch.get_rng_state(), state)  # the calibration sample draws from its own generator
    trainer.train()
    kd = logged(trainer, "kd_loss")
    assert kd[-1] < 0.5 * kd[0]
    # 20 calibration batches of 8 cover the 64 sequences: γ is the average over all of them
    want = direct_cakld_gamma(teacher, lm_dataset(tokenizer, texts))
    assert 0.01 < want < 0.99  # strictly inside (0, 1): a blend, not one of the two KLs (untrained: ~1/V)
    assert trainer.cakld_gamma == pytest.approx(want, rel=1e-5) and gamma == trainer.cakld_gamma
    assert logged(trainer, "cakld_gamma") == [trainer.cakld_gamma] * 20


def test_cakld_gamma_from_a_seeded_sample_of_the_calibration_batches(tmp_path, tokenizer, texts):
    teacher = make_model()
    trainer = sdft_trainer(tmp_path, perturb(copy.deepcopy(teacher)), teacher, tokenizer, texts, kd_loss="cakld",
                           cakld_calibration_batches=2, seed=3)
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:16].tolist()
    dataset = lm_dataset(tokenizer, texts)
    assert trainer.estimate_cakld_gamma() == pytest.approx(direct_cakld_gamma(teacher, dataset, rows), rel=1e-5)
    assert trainer.estimate_cakld_gamma() != pytest.approx(direct_cakld_gamma(teacher, dataset), rel=1e-3)


@pytest.mark.parametrize("gamma,same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_cakld_with_a_given_gamma_at_its_ends_trains_as_the_kl_it_is(tmp_path, tokenizer, texts, gamma, same_as):
    runs = {}
    for name, kw in (("cakld", dict(kd_loss="cakld", cakld_gamma=gamma)), ("kl", dict(kd_loss=same_as))):
        teacher = make_model()
        trainer = sdft_trainer(tmp_path / name, perturb(copy.deepcopy(teacher)), teacher, tokenizer, texts,
                               max_steps=2, learning_rate=1e-2, kd_ratio=0.8, **kw)
        trainer.train()
        runs[name] = trainer
    assert logged(runs["cakld"], "cakld_gamma") == [gamma, gamma]  # given, not estimated
    assert logged(runs["kl"], "cakld_gamma") == []
    for key in ("kd_loss", "loss"):
        assert logged(runs["cakld"], key) == logged(runs["kl"], key)


def test_cka_history_saved_and_continued_after_resume(tmp_path, tokenizer, texts):
    kw = dict(max_steps=6, learning_rate=1e-3, save_strategy="steps", save_steps=3)

    def run(resume=None):
        teacher = make_model()
        student = perturb(copy.deepcopy(teacher))
        cb = CKACallback(texts[:8], every_n_steps=3)
        trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, [cb], **kw)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    saved = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in cka_history(saved["log_history"])] == [0, 3]
    resumed = run(resume=str(tmp_path / "checkpoint-3"))
    history = cka_history(resumed.state.log_history)
    assert [h["step"] for h in history] == [0, 3, 6]
    assert resumed.state.global_step == 6
    assert [e["step"] for e in resumed.state.log_history if "loss" in e][-3:] == [4, 5, 6]
    assert history[-1]["mean"] == pytest.approx(cka_history(full.state.log_history)[-1]["mean"], rel=1e-4)


def test_teacher_is_frozen_and_not_saved(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=3, learning_rate=1e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("teacher" in k for k in saved)
    torch.testing.assert_close(saved["model.layers.0.mlp.up_proj.weight"], student.model.layers[0].mlp.up_proj.weight)


def test_cka_loss_is_one_minus_mean_linear_cka(tmp_path, tokenizer, texts):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=1, cka_weight=1.0,
                           kd_ratio=0.0, cka_layers=[0])
    batch = next(iter(trainer.get_train_dataloader()))
    student.eval()
    trainer.compute_loss(student, dict(batch))
    got = trainer._sdft_metrics["eval"]["cka_loss"][-1].item()
    rows = batch["attention_mask"].bool()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # hidden_states[1] is the output of decoder layer 0
        hs = student(**inputs, output_hidden_states=True).hidden_states[1]
        ht = teacher(**inputs, output_hidden_states=True).hidden_states[1]
    assert got == pytest.approx(1 - linear_cka(hs[rows], ht[rows]).item(), rel=1e-5)


class TestErrors:
    def test_vocab_mismatch(self, tmp_path, tokenizer, texts):
        with pytest.raises(ValueError, match="vocabularies differ: student has 32 output logits, teacher 40"):
            sdft_trainer(tmp_path, make_model(), make_model(vocab_size=40), tokenizer, texts)

    def test_teacher_is_student(self, tmp_path, tokenizer, texts):
        m = make_model()
        with pytest.raises(ValueError, match="teacher_model is the student object itself"):
            sdft_trainer(tmp_path, m, m, tokenizer, texts)

    def test_teacher_shares_weights(self, tmp_path, tokenizer, texts):
        m = make_model()
        t = make_model()
        t.model.layers[0].mlp.up_proj.weight = m.model.layers[0].mlp.up_proj.weight
        with pytest.raises(ValueError, match="shares weight tensors"):
            sdft_trainer(tmp_path, m, t, tokenizer, texts)

    def test_missing_cka_layers(self, tmp_path, tokenizer, texts):
        with pytest.raises(ValueError, match=r"names layers \[5\] that the models do not have"):
            sdft_trainer(tmp_path, make_model(), make_model(), tokenizer, texts, cka_weight=0.1, cka_layers="0,5")

    def test_all_layers_with_different_depths(self, tmp_path, tokenizer, texts):
        with pytest.raises(ValueError, match="student has 2 decoder layers and the teacher 3"):
            sdft_trainer(tmp_path, make_model(), make_model(layers=3), tokenizer, texts, cka_weight=0.1)

    def test_unknown_kd_loss(self, tmp_path):
        with pytest.raises(ValueError, match="kd_loss='kl' is unknown: choose one of forward_kl, reverse_kl, jsd, cakld"):
            SDFTConfig(output_dir=str(tmp_path), kd_loss="kl")

    @pytest.mark.parametrize("field,value,msg", [
        ("kd_ratio", 1.5, "kd_ratio=1.5 must be in"), ("kd_beta", -0.1, "kd_beta=-0.1 must be in"),
        ("kd_temperature", 0.0, "kd_temperature=0.0 must be > 0"), ("cka_layers", "a,b", "decoder-layer indices"),
        ("cakld_gamma", 0.5, "cakld_gamma=0.5 weighs CAKLD's two KLs but kd_loss='forward_kl'"),
        ("cakld_calibration_batches", 0, "cakld_calibration_batches=0 must be a positive"),
    ])
    def test_config_validation(self, tmp_path, field, value, msg):
        with pytest.raises(ValueError, match=msg):
            SDFTSFTConfig(output_dir=str(tmp_path), **{field: value})

    def test_cakld_gamma_outside_0_1(self, tmp_path):
        with pytest.raises(ValueError, match=r"cakld_gamma=1.5 must be in \[0, 1\]"):
            SDFTConfig(output_dir=str(tmp_path), kd_loss="cakld", cakld_gamma=1.5)

    def test_cakld_without_labels_to_estimate_gamma_from(self, tmp_path, tokenizer, texts):
        trainer = sdft_trainer(tmp_path, make_model(), make_model(seed=1), tokenizer, texts, kd_loss="cakld")
        trainer.train_dataset = trainer.train_dataset.map(lambda row: {"labels": [-100] * len(row["labels"])})
        with pytest.raises(ValueError, match="hold no label token to estimate γ from"):
            trainer.estimate_cakld_gamma()

    def test_frozen_student(self, tmp_path, tokenizer, texts):
        with pytest.raises(ValueError, match="the student has no trainable parameter"):
            sdft_trainer(tmp_path, make_model().requires_grad_(False), make_model(), tokenizer, texts)

    def test_unsupported_sft_loss_options(self, tmp_path):
        """Refused by the config itself, before any trainer or dataset is built."""
        with pytest.raises(ValueError, match="loss_type must be 'nll'"):
            SDFTSFTConfig(output_dir=str(tmp_path), **cpu_args(gradient_checkpointing=False), loss_type="dft")
        with pytest.raises(ValueError, match="label_smoothing_factor 0"):
            SDFTConfig(output_dir=str(tmp_path), **cpu_args(), label_smoothing_factor=0.1)

    def test_no_teacher(self, tmp_path, tokenizer, texts):
        with pytest.raises(ValueError, match="no teacher: pass teacher_model="):
            sdft_trainer(tmp_path, make_model(), None, tokenizer, texts)

    def test_fully_masked_batch(self, tmp_path, tokenizer, texts):
        trainer = sdft_trainer(tmp_path, make_model(), make_model(seed=1), tokenizer, texts, max_steps=1)
        batch = next(iter(trainer.get_train_dataloader()))
        batch["labels"][:] = -100
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # as train() sets it
        loss = trainer.compute_loss(trainer.model, batch)  # no host sync to check it here: adds nothing
        assert loss.item() == 0.0
        with pytest.raises(ValueError, match="no supervised token"):  # the next log says so
            trainer.log({"loss": 0.0})

    def test_empty_probe(self):
        with pytest.raises(ValueError, match="non-empty probe_dataset"):
            CKACallback([])

    def test_callback_without_teacher(self, tmp_path, tokenizer, texts):
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path), **cpu_args(max_steps=1))
        trainer = Trainer(model=make_model(), args=args, train_dataset=lm_dataset(tokenizer, texts),
                          callbacks=[CKACallback(texts[:4])], processing_class=tokenizer)
        with pytest.raises(ValueError, match="CKACallback has no teacher"):
            trainer.train()


def test_callback_works_with_plain_trainer(tmp_path, tokenizer, texts):
    from transformers import Trainer, TrainingArguments

    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    args = TrainingArguments(output_dir=str(tmp_path), **cpu_args(max_steps=2, learning_rate=1e-3))
    cb = CKACallback(texts[:8], teacher_model=teacher, debiased=True)
    trainer = Trainer(model=student, args=args, train_dataset=lm_dataset(tokenizer, texts), callbacks=[cb],
                      processing_class=tokenizer)
    trainer.train()
    history = cka_history(trainer.state.log_history)
    assert [h["step"] for h in history] == [0, 2]
    assert 0.0 < history[0]["mean"] < 1.0


@pytest.mark.parametrize("layers", ["all", [0]])
def test_cka_measurement_stops_after_the_last_layer_and_matches_hidden_states(tokenizer, texts, layers):
    from hf_sdft.cka.callback import tokenize_probe
    from hf_sdft.cka.measure import measure_cka
    from hf_sdft.cka.metric import linear_cka

    teacher = make_model(layers=3)
    student = perturb(copy.deepcopy(teacher))
    batches = tokenize_probe(texts[:6], tokenizer, max_tokens=10**6, batch_size=6)
    assert len(batches) == 1
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (student.lm_head, teacher.lm_head)]
    got_layers, got = measure_cka(student, teacher, batches, layers)
    assert not calls  # the heads (and layers after the last measured one) never ran
    for h in hooks:
        h.remove()
    rows = batches[0]["attention_mask"].bool()
    with torch.no_grad():
        hs, ht = (m(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                    output_hidden_states=True).hidden_states for m in (student, teacher))
    # hidden_states[i + 1] is decoder layer i's output (the last one after the final norm: not compared)
    expected = [linear_cka(hs[i + 1][rows], ht[i + 1][rows]).item() for i in got_layers if i + 1 < len(hs) - 1]
    assert got_layers == ([0, 1, 2] if layers == "all" else [0])
    assert got.tolist()[: len(expected)] == pytest.approx(expected, rel=1e-9)


def test_cakld_in_the_sft_trainer_and_with_a_peft_students_base_as_teacher(tmp_path, tokenizer, texts):
    teacher = make_model()
    args = SDFTSFTConfig(output_dir=str(tmp_path), **cpu_args(per_device_train_batch_size=8, max_steps=2,
                                                              gradient_checkpointing=False, max_length=32),
                         kd_loss="cakld", cakld_calibration_batches=3)
    sft = SDFTSFTTrainer(model=perturb(copy.deepcopy(teacher)), args=args, teacher_model=teacher,
                         processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}))
    sft.train()  # TRL's tokenization and collator feed the calibration batches
    assert len(logged(sft, "cakld_gamma")) == 2 and 0.0 < sft.cakld_gamma < 1.0
    base = make_model()
    student = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # adapters that change the student: γ must still come from the base alone
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft = sdft_trainer(tmp_path / "p", student, None, tokenizer, texts, kd_loss="cakld")
    online = sdft_trainer(tmp_path / "o", make_model(seed=5), base, tokenizer, texts, kd_loss="cakld")
    assert peft.estimate_cakld_gamma() == pytest.approx(online.estimate_cakld_gamma(), rel=1e-6)
