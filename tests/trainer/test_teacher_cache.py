"""Offline teacher outputs: the top-k loss against the online loss and a reference written here,
the cache writer, training from a cache without a teacher, and the cache-teacher command."""

import copy
import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from hf_sdft import SDFTConfig, SDFTTrainer
from hf_sdft.cli import main
from hf_sdft.trainer.losses import cached_label_logprobs, distillation_loss, label_logprobs, topk_distillation_loss
from hf_sdft.trainer.teacher_cache import cache_metadata, cache_teacher, topk_outputs
from tests.helpers import cpu_args, make_model, make_tokenizer, perturb
from tests.jobs.test_recover import (
    recover,
    tiny,  # noqa: F401  (module fixture)
)
from tests.trainer.test_trainer import lm_dataset, logged, sdft_trainer

from .test_losses import np_softmax


def cached_outputs(teacher_logits, k):
    log_p = torch.log_softmax(teacher_logits, -1)
    values, ids = log_p.topk(k, -1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1)
    return ids.int(), values, tail


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                       ("cakld", 0.3)])
def test_full_vocabulary_cache_equals_the_online_loss(kind, beta):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 6, 30, generator=g) * 2, torch.randn(4, 6, 30, generator=g) * 2
    mask = torch.rand(4, 6, generator=g) > 0.3
    online = distillation_loss(zs, zt, mask, loss_type=kind, beta=beta)
    for chunk in (None, 5):
        cached = topk_distillation_loss(zs, *cached_outputs(zt, 30), mask, loss_type=kind, beta=beta, chunk_size=chunk)
        assert cached.item() == pytest.approx(online.item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "cakld"])
def test_topk_loss_matches_a_bucketed_reference(kind):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(7, 25, generator=g) * 2, torch.randn(7, 25, generator=g) * 2
    k, beta = 5, 0.5
    ids, values, tail = cached_outputs(zt, k)
    got = topk_distillation_loss(zs, ids, values, tail, loss_type=kind, beta=beta).item()
    ps, pt = np_softmax(zs.numpy()), np_softmax(zt.numpy())
    expected = []
    for row in range(7):  # k + 1 outcomes: the teacher's top-k tokens, then everything else
        top = ids[row].long().numpy()
        rest = np.setdiff1d(np.arange(25), top)
        a = np.append(ps[row, top], ps[row, rest].sum())
        b = np.append(pt[row, top], pt[row, rest].sum())
        if kind == "forward_kl":
            expected.append((b * np.log(b / a)).sum())
        elif kind == "reverse_kl":
            expected.append((a * np.log(a / b)).sum())
        elif kind == "cakld":  # γ = beta on reverse KL, 1 − γ on forward KL, over the k + 1 outcomes
            expected.append(beta * (a * np.log(a / b)).sum() + (1 - beta) * (b * np.log(b / a)).sum())
        else:
            m = beta * b + (1 - beta) * a
            expected.append((beta * (b * np.log(b / m)).sum() + (1 - beta) * (a * np.log(a / m)).sum()) / (beta * (1 - beta)))
    assert got == pytest.approx(np.mean(expected), rel=1e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.35, 1.0])
def test_cakld_from_a_full_cache_equals_a_direct_implementation(gamma):
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(3, 5, 17, generator=g) * 2, torch.randn(3, 5, 17, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    leaf = zs.clone().requires_grad_()
    got = topk_distillation_loss(leaf, *cached_outputs(zt, 17), mask, loss_type="cakld", beta=gamma, chunk_size=4)
    got.backward()
    ref = zs.double().requires_grad_()
    ps, pt = torch.softmax(ref, -1), torch.softmax(zt.double(), -1)
    d = gamma * (ps * (ps / pt).log()).sum(-1) + (1 - gamma) * (pt * (pt / ps).log()).sum(-1)
    d[mask].mean().backward()
    assert got.item() == pytest.approx(d[mask].mean().item(), rel=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_cached_label_probabilities_are_exact_at_k_equal_v_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(3)
    zt = torch.randn(2, 6, 13, generator=g) * 2
    labels = torch.randint(13, (2, 6), generator=g)
    labels[0, 0] = -100
    online = label_logprobs(zt, labels)
    full = cached_label_logprobs(*cached_outputs(zt, 13)[:2], labels)
    torch.testing.assert_close(full, online)
    ids, values, _ = cached_outputs(zt, 3)
    part = cached_label_logprobs(ids, values, labels)
    inside = (ids.long() == labels[..., None]).any(-1)
    torch.testing.assert_close(part[inside], online[inside])
    assert torch.isinf(part[~inside]).all() and (~inside).sum() > 1  # outside the top-3: probability 0


def test_cache_writer_shards_and_mass(tmp_path, tokenizer, texts):
    teacher = make_model()
    data = lm_dataset(tokenizer, texts[:20]).remove_columns("attention_mask")
    meta = cache_teacher(teacher, data, tmp_path / "cache", top_k=7, batch_size=4, shard_rows=6)
    ds = load_from_disk(str(tmp_path / "cache"))
    assert len(ds) == 20 and cache_metadata(ds)["top_k"] == 7
    assert json.loads((tmp_path / "cache" / "sdft_cache.json").read_text())["bytes_per_token"] == meta["bytes_per_token"]
    row = ds[3]
    lp, tail = torch.tensor(row["teacher_topk_logprobs"]), torch.tensor(row["teacher_tail_logprob"])
    assert torch.allclose(lp.exp().sum(-1) + tail.exp(), torch.ones(len(tail)), atol=1e-5)  # top-k + tail = 1
    batch = {"input_ids": torch.tensor([row["input_ids"]]), "attention_mask": torch.ones(1, len(row["input_ids"]))}
    fresh = topk_outputs(teacher, batch, 7, 1.0)
    assert torch.equal(fresh["teacher_topk_ids"][0], torch.tensor(row["teacher_topk_ids"]))


@pytest.mark.parametrize("kd_loss", ["forward_kl", "cakld"])
def test_training_from_a_full_cache_equals_online_training(tmp_path, tokenizer, texts, kd_loss):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    vocab = teacher.config.vocab_size
    cache_teacher(teacher, lm_dataset(tokenizer, texts), tmp_path / "cache", top_k=vocab, batch_size=8)
    args = SDFTConfig(output_dir=str(tmp_path / "c"), **cpu_args(per_device_train_batch_size=8, max_steps=3,
                                                                 learning_rate=1e-2, kd_ratio=0.7, kd_loss=kd_loss))
    from_cache = SDFTTrainer(model=copy.deepcopy(student), args=args, train_dataset=load_from_disk(str(tmp_path / "cache")))
    assert from_cache.teacher_model is None
    from_cache.train()
    online = sdft_trainer(tmp_path / "o", copy.deepcopy(student), teacher, tokenizer, texts, max_steps=3,
                          learning_rate=1e-2, kd_ratio=0.7, kd_loss=kd_loss)
    online.train()
    if kd_loss == "cakld":  # γ from the cached top-V log-probabilities equals γ from the teacher
        assert 0.0 < from_cache.cakld_gamma < 1.0
        assert from_cache.cakld_gamma == pytest.approx(online.cakld_gamma, rel=1e-5)
        assert logged(from_cache, "cakld_gamma") == pytest.approx(logged(online, "cakld_gamma"), rel=1e-5)
    for key in ("kd_loss", "ce_loss"):
        assert logged(from_cache, key) == pytest.approx(logged(online, key), rel=1e-4, abs=1e-6)


def test_cache_refuses_settings_it_cannot_serve(tmp_path, tokenizer, texts):
    teacher = make_model()
    cache_teacher(teacher, lm_dataset(tokenizer, texts[:8]), tmp_path / "cache", top_k=4, temperature=2.0)
    ds = load_from_disk(str(tmp_path / "cache"))
    for kw, msg in (({"kd_temperature": 1.0}, "temperature 2.0"), ({"kd_temperature": 2.0, "cka_weight": 0.1}, "cka_weight")):
        args = SDFTConfig(output_dir=str(tmp_path), **cpu_args(**kw))
        with pytest.raises(ValueError, match=msg):
            SDFTTrainer(model=perturb(copy.deepcopy(teacher)), args=args, train_dataset=ds)
    with pytest.raises(ValueError, match="top_k"):
        cache_teacher(teacher, lm_dataset(tokenizer, texts[:8]), tmp_path / "x", top_k=10_000)


def test_cache_teacher_command_then_recover_from_it(tiny, tmp_path, capsys):  # noqa: F811
    common = ["--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
              "--eval_file", str(tiny / "eval.txt"), "--block_size", "32", "--use_cpu", "true", "--disable_tqdm", "true"]
    main(["cache-teacher", *common, "--degradation", "prune", "--top_k", "8", "--output_dir", str(tmp_path / "cache")])
    assert "bytes/token" in capsys.readouterr().out
    stats, _ = recover(tiny, tmp_path / "out", "--degradation", "prune", "--teacher_cache", str(tmp_path / "cache"))
    assert stats["perplexity"]["recovered"] < stats["perplexity"]["degraded"]
    assert stats["cka"]["mean_after"] is not None
    meta = json.loads((tmp_path / "cache" / "sdft_cache.json").read_text())
    assert stats["teacher_cache"] == {"path": "cache", "teacher": "model", "top_k": 8, "temperature": 1.0,
                                      "tokens": meta["tokens"], "block_size": 32, "data": meta["data"],
                                      "teacher_weights": meta["teacher_weights"], "tokenizer": meta["tokenizer"]}


def test_cache_is_checked_against_the_run(tiny, tmp_path):  # noqa: F811
    """Issue 26.2: a cache made from another teacher, block size or data, or with a damaged shard, is refused."""
    common = ["--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
              "--eval_file", str(tiny / "eval.txt"), "--block_size", "32", "--use_cpu", "true", "--disable_tqdm", "true"]
    cache = tmp_path / "cache"
    main(["cache-teacher", *common, "--degradation", "prune", "--top_k", "4", "--output_dir", str(cache)])
    meta = json.loads((cache / "sdft_cache.json").read_text())
    assert {"teacher_config", "teacher_weights", "tokenizer", "block_size", "data", "shards"} <= set(meta)
    flags = ["--degradation", "prune", "--teacher_cache", str(cache), "--max_steps", "1"]
    with pytest.raises(ValueError, match=r"does not match this run: the block size differs \(block_size: cache 32, "
                                         r"this run 16\)"):
        recover(tiny, tmp_path / "a", *flags, "--block_size", "16")
    other = tmp_path / "other"
    perturb(make_model()).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="does not match this run: the teacher's weights differ"):
        recover(tiny, tmp_path / "b", *flags, "--model_name_or_path", str(other))
    (tiny / "train2.txt").write_text((tiny / "train.txt").read_text()[::-1])
    with pytest.raises(ValueError, match="does not match this run: the training data differs"):
        recover(tiny, tmp_path / "c", *flags, "--train_file", str(tiny / "train2.txt"))
    [shard] = list(cache.glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"shard {shard.name} is truncated or corrupt"):
        recover(tiny, tmp_path / "d", *flags)
