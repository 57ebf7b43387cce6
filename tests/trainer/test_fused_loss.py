"""fused_linear_distillation_loss against reference formulas on full logits written here
(float64 autograd), and the trainers' fused path against their unfused one."""

import copy
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sdft import SDFTConfig
from hf_sdft.trainer.fused import HostRowIndex, fused_linear_distillation_loss, fused_linear_kd_ce_loss
from tests.helpers import cpu_args, make_model, make_texts, perturb
from tests.trainer.test_trainer import logged, sdft_trainer


def reference(zs, zt, mask, labels, kind, beta, temp):
    """KD sum and CE sum (float64) from full logits ``(N, V)``, formulas of the papers."""
    ps, pt = torch.softmax(zs / temp, -1), torch.softmax(zt / temp, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        d = kl(pt, ps)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        d = kl(ps, pt)
    elif kind == "cakld":  # BitDistiller: γ·KL(p_S‖p_T) + (1 − γ)·KL(p_T‖p_S), γ = beta; no special ends
        d = beta * kl(ps, pt) + (1 - beta) * kl(pt, ps)
    else:
        m = beta * pt + (1 - beta) * ps
        d = (beta * kl(pt, m) + (1 - beta) * kl(ps, m)) / (beta * (1 - beta))
    kd = (d * mask).sum() * temp**2
    valid = labels != -100
    logp = torch.log_softmax(zs, -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ce = -(logp * valid).sum()
    return kd, ce


def problem(seed=0, n=(3, 13), hidden=12, teacher_hidden=9, vocab=41, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hs, ws = r(*n, hidden).requires_grad_(), r(vocab, hidden, scale=0.7).requires_grad_()
    bs = r(vocab).requires_grad_() if bias else None
    ht, wt, bt = r(*n, teacher_hidden), r(vocab, teacher_hidden, scale=0.7), r(vocab) if bias else None
    labels = torch.randint(vocab, n, generator=g)
    labels[..., ::4] = -100
    return hs, ws, bs, ht, wt, bt, labels


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("jsd", 0.0), ("jsd", 1.0), ("cakld", 0.3), ("cakld", 0.0), ("cakld", 1.0)])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 5, 1000])
def test_matches_reference_values_and_gradients(kind, beta, temp, chunk):
    hs, ws, bs, ht, wt, bt, labels = problem()
    mask = labels != -100
    mask[0, 1] = True  # a distilled position without a label: KD and CE supervise different rows
    kd, ce = fused_linear_distillation_loss(hs, ws, ht, wt, mask, labels, loss_type=kind, beta=beta, temperature=temp,
                                            chunk_size=chunk, student_head_bias=bs, teacher_head_bias=bt)
    (0.3 * kd + 0.7 * ce).backward()
    got = [t.grad.clone() for t in (hs, ws, bs)]

    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    zs = leaves[0].reshape(-1, hs.shape[-1]) @ leaves[1].T + leaves[2]
    zt = ht.double().reshape(-1, ht.shape[-1]) @ wt.double().T + bt.double()
    kd_sum, ce_sum = reference(zs, zt, mask.reshape(-1).double(), labels.reshape(-1), kind, beta, temp)
    kd_ref, ce_ref = kd_sum / mask.sum(), ce_sum / (labels != -100).sum()
    (0.3 * kd_ref + 0.7 * ce_ref).backward()
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5, abs=1e-6)
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-4, atol=1e-6)


def test_num_items_in_batch_and_defaults():
    hs, ws, _, ht, wt, _, labels = problem(bias=False)
    kd, ce = fused_linear_distillation_loss(hs, ws, ht, wt, labels=labels, num_items_in_batch=50)
    zs, zt = (hs.detach().double() @ ws.detach().double().T), (ht.double() @ wt.double().T)
    valid = (labels != -100).double()
    kd_sum, ce_sum = reference(zs.reshape(-1, 41), zt.reshape(-1, 41), valid.reshape(-1), labels.reshape(-1),
                               "forward_kl", 0.5, 1.0)
    assert kd.item() == pytest.approx(kd_sum.item() / 50, rel=1e-5)  # mask defaults to the labelled positions
    assert ce.item() == pytest.approx(ce_sum.item() / 50, rel=1e-5)
    kd_only, none = fused_linear_distillation_loss(hs, ws, ht, wt)
    assert none is None
    all_rows = reference(zs.reshape(-1, 41), zt.reshape(-1, 41), torch.ones(39, dtype=torch.float64),
                         labels.reshape(-1), "forward_kl", 0.5, 1.0)[0] / 39
    assert kd_only.item() == pytest.approx(all_rows.item(), rel=1e-5)


class HeadSizedTensors(TorchDispatchMode):
    """Counts the tensors of ``numel`` elements that operations create (gradient buffers of a head)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default):
            self.count += out.numel() == self.numel
        return out


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("cakld", 0.7)])
def test_weighted_loss_gradient_in_one_buffer(ratio, temp, kind, beta):
    hs, ws, bs, ht, wt, bt, labels = problem()
    mask = labels != -100
    mask[1, 2] = True
    with HeadSizedTensors(ws.numel()) as buffers:
        loss, kd, ce = fused_linear_kd_ce_loss(hs, ws, ht, wt, mask, labels, kd_ratio=ratio, temperature=temp,
                                               num_items_in_batch=30, student_head_bias=bs, teacher_head_bias=bt,
                                               loss_type=kind, beta=beta)
    assert buffers.count == 1  # the two-output function keeps two
    assert not kd.requires_grad and not ce.requires_grad
    loss.backward()
    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    zs = leaves[0].reshape(-1, 12) @ leaves[1].T + leaves[2]
    zt = ht.double().reshape(-1, 9) @ wt.double().T + bt.double()
    kd_sum, ce_sum = reference(zs, zt, mask.reshape(-1).double(), labels.reshape(-1), kind, beta, temp)
    ref = (ratio * kd_sum + (1 - ratio) * ce_sum) / 30
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd.item() == pytest.approx(kd_sum.item() / 30, rel=1e-5) and ce.item() == pytest.approx(ce_sum.item() / 30, rel=1e-5)
    for t, leaf in zip((hs, ws, bs), leaves):
        torch.testing.assert_close(t.grad.double(), leaf.grad, rtol=1e-4, atol=1e-7)
    with HeadSizedTensors(ws.numel()) as buffers:
        fused_linear_distillation_loss(hs, ws, ht, wt, mask, labels)
    assert buffers.count == 2


def test_weighted_loss_refuses_a_ratio_outside_0_1():
    hs, ws, _, ht, wt, _, labels = problem(bias=False)
    with pytest.raises(ValueError, match="kd_ratio"):
        fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    hs, ws, bs, ht, wt, bt, labels = problem(dtype=dtype)
    kd, ce = fused_linear_distillation_loss(hs, ws, ht, wt, labels=labels, chunk_size=4,
                                            student_head_bias=bs, teacher_head_bias=bt)
    assert kd.dtype == torch.float32 and ce.dtype == torch.float32
    (kd + ce).backward()
    assert hs.grad.dtype == dtype and ws.grad.dtype == dtype
    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    zs = leaves[0].reshape(-1, 12) @ leaves[1].T + leaves[2]
    zt = ht.double().reshape(-1, 9) @ wt.double().T + bt.double()
    valid = labels.reshape(-1) != -100
    kd_sum, ce_sum = reference(zs, zt, valid.double(), labels.reshape(-1), "forward_kl", 0.5, 1.0)
    ((kd_sum + ce_sum) / valid.sum()).backward()
    assert kd.item() == pytest.approx(kd_sum.item() / valid.sum().item(), rel=0.05, abs=0.02)
    torch.testing.assert_close(ws.grad.double(), leaves[1].grad, rtol=0.05, atol=0.02)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_tensor_is_ever_built():
    n, hidden, vocab = 64, 8, 512
    hs = torch.randn(n, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden, requires_grad=True)
    ht, wt = torch.randn(n, hidden), torch.randn(vocab, hidden)
    labels = torch.randint(vocab, (n,))
    with LargestTensor() as seen:
        kd, ce = fused_linear_distillation_loss(hs, ws, ht, wt, labels=labels, chunk_size=8)
        (kd + ce).backward()
    assert seen.largest <= 8 * vocab < n * vocab  # one chunk of logits at most; the gradient of W is V×H
    with LargestTensor() as full:  # the check can fail: the unfused computation is caught
        (torch.log_softmax(hs @ ws.T, -1).sum()).backward()
    assert full.largest == n * vocab


def test_mismatched_inputs_are_refused():
    hs, ws, _, ht, wt, _, labels = problem(bias=False)
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_linear_distillation_loss(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="positions differ"):
        fused_linear_distillation_loss(hs, ws, ht[:, :-1], wt)
    with pytest.raises(ValueError, match="labels shape"):
        fused_linear_distillation_loss(hs, ws, ht, wt, labels=labels[:, :-1])


# ---------------------------------------------------------------------------- in the trainers


def one_step_state(tmp_path, tokenizer, texts, untied, **kw):
    teacher = make_model(seed=0)
    if untied:  # an untied head with its own weights, as the second test model has
        teacher.config.tie_word_embeddings = False
        teacher.lm_head.weight = torch.nn.Parameter(teacher.lm_head.weight.detach().clone() * 1.3)
    student = perturb(copy.deepcopy(teacher))
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=2, learning_rate=1e-2, **kw)
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("kd_ratio,kd_loss", [(1.0, "forward_kl"), (0.6, "jsd"), (0.8, "cakld")])
def test_trainer_fused_equals_unfused(tmp_path, tokenizer, texts, untied, kd_ratio, kd_loss):
    kw = dict(kd_ratio=kd_ratio, kd_loss=kd_loss, gradient_accumulation_steps=2)
    fused, w_fused = one_step_state(tmp_path / "f", tokenizer, texts, untied, **kw)
    plain, w_plain = one_step_state(tmp_path / "u", tokenizer, texts, untied, kd_fused=False, **kw)
    assert fused.fused_heads is not None and plain.fused_heads is None
    for key in ("kd_loss", "ce_loss", "loss"):
        assert logged(fused, key) == pytest.approx(logged(plain, key), rel=1e-4)
    if kd_loss == "cakld":  # γ from the teacher's head input, chunk by chunk, equals γ from its logits
        assert fused.cakld_gamma == pytest.approx(plain.cakld_gamma, rel=1e-5)
    for name, w in w_fused.items():
        torch.testing.assert_close(w, w_plain[name], rtol=1e-3, atol=1e-4)  # Adam steps of ~1e-2


def test_teacher_dtype_and_device(tmp_path, tokenizer, texts):
    trainer, _ = one_step_state(tmp_path, tokenizer, texts, False, teacher_dtype="bfloat16", teacher_device="cpu")
    assert {p.dtype for p in trainer.teacher_model.parameters()} == {torch.bfloat16}
    assert all(v == v and v > 0 for v in logged(trainer, "kd_loss"))  # finite, positive KD from a bf16 teacher
    auto = SDFTConfig(output_dir=str(tmp_path), **cpu_args())
    assert auto.resolve_teacher_dtype(torch.float32) is torch.float32  # no native bf16 on this CPU run
    with pytest.raises(ValueError, match="teacher_dtype"):
        SDFTConfig(output_dir=str(tmp_path), teacher_dtype="int8", **cpu_args())


def test_logit_transforming_model_falls_back_to_its_logits(tmp_path, tokenizer, texts):
    teacher = make_model()
    teacher.config.final_logit_softcapping = 30.0
    trainer = sdft_trainer(tmp_path, perturb(copy.deepcopy(teacher)), teacher, tokenizer, make_texts(16), max_steps=1)
    assert trainer.fused_heads is None


# ---------------------------------------------------------------------------- the GPU hot path, proven on CPU


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make a GPU wait for the host: scalar reads (``.item()``,
    ``bool(t)``), ``nonzero`` and boolean-mask indexing (which call ``nonzero``)."""

    def __init__(self):
        super().__init__()
        self.ops, self.ours = [], []  # op names; whether hf_sdft's code (not transformers') asked
        self.at, self.first_matmul, self.count = [], None, 0  # when each was asked, in ops dispatched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.count += 1
        if self.first_matmul is None and name in ("mm", "addmm", "bmm"):
            self.first_matmul = self.count
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "masked_scatter") or boolean_index:
            caller = next(f.filename for f in reversed(traceback.extract_stack()) if "/torch/" not in f.filename
                          and not f.filename.endswith("test_fused_loss.py"))
            self.ops.append(name)
            self.ours.append("/hf_sdft/" in caller)
            self.at.append(self.count)
        return func(*args, **(kwargs or {}))


def syncs_of_one_call(n, chunk, kd_ratio=0.4, **kw):
    g = torch.Generator().manual_seed(n)
    hs = torch.randn(n, 16, generator=g, requires_grad=True)
    ws = torch.randn(96, 16, generator=g, requires_grad=True)
    labels = torch.randint(96, (n,), generator=g)
    labels[::3] = -100  # masked rows: the compaction runs
    with HostSyncs() as seen:
        loss, _, _ = fused_linear_kd_ce_loss(hs, ws, torch.randn(n, 16, generator=g), torch.randn(96, 16, generator=g),
                                             labels=labels, kd_ratio=kd_ratio, chunk_size=chunk, **kw)
        loss.backward()
    return seen.ops


@pytest.mark.parametrize("kd_ratio,kind", [(0.4, "forward_kl"), (1.0, "reverse_kl"), (0.7, "jsd"), (0.5, "cakld")])
def test_fused_loss_host_syncs_do_not_grow_with_the_chunks(kd_ratio, kind):
    few, many = syncs_of_one_call(32, 8, kd_ratio, loss_type=kind), syncs_of_one_call(256, 8, kd_ratio, loss_type=kind)
    assert few == many == ["nonzero"]  # 4 and 32 chunks: the one compaction of unsupervised rows
    assert len(syncs_of_one_call(256, 8, kd_ratio, temperature=2.0, loss_type=kind)) == 1


def sdft_step_syncs(tmp_path, tokenizer, seq_len, chunk, seen_out=None, **kw):
    """Host syncs in one SDFT micro-batch step (forward, fused loss, backward) of the trainer
    (``seen_out``: a list that receives the :class:`HostSyncs` record)."""
    teacher = make_model(seed=0)
    trainer = sdft_trainer(tmp_path, perturb(copy.deepcopy(teacher)), teacher, tokenizer, make_texts(16),
                           max_steps=1, kd_chunk_size=chunk, kd_ratio=0.5, **kw)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # as train() sets it
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(tokenizer.vocab_size, (4, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # a prompt part: the compaction runs
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with HostSyncs() as seen:
        trainer.training_step(trainer.model, batch, num_items_in_batch=(labels[:, 1:] != -100).sum())
    assert trainer.fused_heads is not None
    if seen_out is not None:
        seen_out.append(seen)
    return list(zip(seen.ops, seen.ours))


def test_sdft_step_host_syncs_are_constant(tmp_path, tokenizer):
    seen = []
    short = sdft_step_syncs(tmp_path / "a", tokenizer, 16, 8, seen)  # 6 chunks
    long = sdft_step_syncs(tmp_path / "b", tokenizer, 64, 8)  # 24 chunks
    assert short == long
    # ours: the loss's row index only (the empty-batch check waits for the log's one gather);
    # transformers' mask check once per model forward
    assert [op for op, ours in short if ours] == ["nonzero"], short
    assert len(short) == 3, short
    # issue 27.5: the row index is found before the forwards run (HostRowIndex), not after them
    ours_at = [at for at, ours in zip(seen[0].at, seen[0].ours) if ours]
    assert ours_at[0] < seen[0].first_matmul, (ours_at, seen[0].first_matmul)


def test_given_kept_rows_remove_the_loss_host_sync():
    """The fused loss with its rows given (HostRowIndex's) reads nothing back to the host and
    computes what it computes finding them itself."""
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(40, 16, generator=g, requires_grad=True), torch.randn(96, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(40, 16, generator=g), torch.randn(96, 16, generator=g)
    labels = torch.randint(96, (40,), generator=g)
    labels[::3] = -100
    results = []
    for given in (False, True):
        rows = HostRowIndex(labels != -100).rows() if given else None
        with HostSyncs() as seen:
            loss, kd, ce = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, chunk_size=8,
                                                   kept_rows=rows)
            loss.backward()
        results.append((seen.ops, loss.detach(), hs.grad.clone(), ws.grad.clone()))
        hs.grad = ws.grad = None
    assert results[0][0] == ["nonzero"] and results[1][0] == []
    for found, given in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(given, found, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kept_rows"):
        fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, kept_rows=labels != -100)


@pytest.mark.parametrize("cka", [{"cka_weight": 0.1}, {"cka_weight": 0.1, "cka_tokens": 24}], ids=["all", "sampled"])
def test_the_cka_regulariser_adds_no_host_sync(tmp_path, tokenizer, cka):
    """Issue 27: the CKA loss keeps positions by weight (no boolean indexing per layer) and samples
    them with a fixed-shape top-k: a step with it stops the host exactly as often as one without."""
    plain = sdft_step_syncs(tmp_path / "a", tokenizer, 16, 8)
    with_cka = sdft_step_syncs(tmp_path / "b", tokenizer, 16, 8, **cka)
    assert with_cka == plain, with_cka


class RecordDtypes(TorchDispatchMode):
    """Input dtypes of every matmul, and dtypes of the (rows, V) softmax and reduction ops."""

    MATMULS = ("mm", "addmm", "bmm", "linear", "matmul")
    FLOAT_ONLY = ("_log_softmax", "logsumexp", "exp", "sum", "mul", "sub", "scatter_add")

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.matmuls, self.wide = vocab, set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in self.MATMULS:
            self.matmuls.add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        elif name.rstrip("_") in self.FLOAT_ONLY and isinstance(out, torch.Tensor) and out.dim() == 2 \
                and out.shape[-1] == self.vocab:
            self.wide.add((name, out.dtype))
        return out


AUTOCAST_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # ~2-4 ulps of the half type, relative


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_autocast_matmuls_in_half_softmax_in_float32_and_equal_to_unfused(dtype, kind):
    hs, ws, bs, ht, wt, bt, labels = problem(n=(4, 24), hidden=32, teacher_hidden=32, vocab=97)
    with RecordDtypes(97) as seen, torch.autocast("cpu", dtype=dtype):
        loss, kd, ce = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, loss_type=kind,
                                               chunk_size=16, student_head_bias=bs, teacher_head_bias=bt)
        loss.backward()
    assert seen.matmuls and all(set(d) == {dtype} for d in seen.matmuls), seen.matmuls
    assert seen.wide and {d for _, d in seen.wide} == {torch.float32}, seen.wide
    assert loss.dtype == torch.float32 and ws.grad.dtype == torch.float32  # master weights keep their dtype
    leaves = [t.detach().requires_grad_() for t in (hs.clone(), ws.clone(), bs.clone())]  # the unfused float32 path
    zs = leaves[0].reshape(-1, 32) @ leaves[1].T + leaves[2]
    zt = ht.reshape(-1, 32) @ wt.T + bt
    valid = labels.reshape(-1) != -100
    kd_sum, ce_sum = reference(zs, zt, valid.float(), labels.reshape(-1), kind, 0.5, 1.0)
    ref = (0.5 * kd_sum + 0.5 * ce_sum) / valid.sum()
    ref.backward()
    tol = AUTOCAST_TOLERANCE[dtype]
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    for fused_grad, leaf in zip((hs.grad, ws.grad, bs.grad), leaves):
        scale = leaf.grad.abs().max()
        assert (fused_grad - leaf.grad).abs().max() <= tol * scale


def test_kernel_choice(monkeypatch):
    hs, ws, _, ht, wt, _, labels = problem(bias=False)
    with pytest.raises(ValueError, match="CUDA"):  # no CUDA, no interpreter here
        fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, kernel="triton")
    with pytest.raises(ValueError, match="choose one of"):
        fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, kernel="cuda")
    auto = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5)  # auto = PyTorch on CPU
    torch_ = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, kernel="torch")
    assert auto[0].item() == torch_[0].item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA device"))])
def test_triton_chunk_kernel_equals_the_pytorch_chunk(device):
    """The Triton kernel (on CPU: run by Triton's interpreter, in a fresh process) against the PyTorch chunk."""
    triton = pytest.importorskip("triton")
    if device == "cpu" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("Triton 3.6's interpreter fails on this kernel (InterpreterError: only 0-dimensional arrays can be "
                    "converted to Python scalars; seen on the H200 image); 3.9's runs it")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TRITON_INTERPRET": "1"} if device == "cpu" else {})}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_check.py")), device], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.splitlines()[-1])
    assert len(cases) == 16 and all(c["kernel_used"] for c in cases)
    for c in cases:  # float32: rounding only; bf16: the stored gradient is rounded to bf16 either way
        tol = 1e-5 if c["dtype"] == "float32" else 1.6e-2
        assert max(c["rel_diff"].values()) <= tol, c
    assert cases[0]["refused_jsd"]


class LossMatmuls(TorchDispatchMode):
    """Input dtypes of the matmuls that the fused loss (hf_sdft/trainer/fused.py) runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in RecordDtypes.MATMULS and any(
                f.filename.endswith("hf_sdft/trainer/fused.py") for f in traceback.extract_stack()):
            self.dtypes.add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_fused_heads_run_in_the_mixed_precision_dtype(tmp_path, tokenizer, bf16):
    """accelerate autocasts only the model's forward: the trainer must autocast the fused loss itself."""
    teacher = make_model(seed=0)
    trainer = sdft_trainer(tmp_path, perturb(copy.deepcopy(teacher)), teacher, tokenizer, make_texts(16), max_steps=1,
                           bf16=bf16, kd_ratio=0.5)
    assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    ids = torch.randint(tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with LossMatmuls() as seen:
        trainer.training_step(trainer.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                              num_items_in_batch=torch.tensor(30))
    assert seen.dtypes == {(torch.bfloat16 if bf16 else torch.float32,) * 2}, seen.dtypes


def test_fp16_grad_scaler_trains_with_the_fused_loss(tmp_path, tokenizer, texts):
    """``fp16=True`` (T4 / V100): the student's forward under float16 autocast, the loss through a
    GradScaler, and the fused loss. accelerate accepts fp16 on CPU but leaves it off there (no
    autocast, no scaler: float32 training); torch runs both on CPU, so the test sets the two
    attributes accelerate sets on CUDA (``native_amp``, ``scaler``) before training."""
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    before = copy.deepcopy(student.state_dict())
    trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, max_steps=8, learning_rate=1e-2, fp16=True)
    acc = trainer.accelerator
    assert acc.mixed_precision == "fp16" and not acc.native_amp and acc.scaler is None  # accelerate on CPU
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
    seen = {"proj": set(), "head": set()}
    student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen["proj"].add(o.dtype))
    student.lm_head.register_forward_hook(lambda m, i, o: seen["head"].add((o.dtype, o.shape[-2])))
    trainer.train()
    assert trainer.fused_heads is not None
    assert seen["proj"] == {torch.float16}  # autocast was on in the student's forward
    assert seen["head"] == {(torch.float16, 0)}  # the fused path: the head saw no positions, no logits
    assert acc.scaler._scale is not None and 0 < acc.scaler.get_scale() < float("inf")  # the scaler scaled the loss
    kd = logged(trainer, "kd_loss")
    assert all(math.isfinite(v) for v in kd + logged(trainer, "loss")) and kd[-1] < kd[0]
    assert any(not torch.equal(p, before[n]) for n, p in student.state_dict().items())


def test_cakld_falls_back_to_the_pytorch_chunk_where_the_kernel_would_run(monkeypatch):
    """The Triton kernel covers forward / reverse KL: CAKLD with 0 < γ < 1 takes the PyTorch chunk
    (refused with kernel='triton'); γ = 0 and 1, which are those KLs exactly, may use the kernel."""
    from hf_sdft.trainer import kd_triton
    from hf_sdft.trainer.fused import _use_kernel

    monkeypatch.setattr(kd_triton, "available", lambda device: True)
    cuda, mix = torch.device("cuda"), (1.0, 0.0)
    assert _use_kernel("auto", cuda, "forward_kl", 0.5, mix)  # the check can fail: the kernel is "there"
    assert not _use_kernel("auto", cuda, "cakld", 0.3, mix)
    assert _use_kernel("auto", cuda, "cakld", 0.0, mix) and _use_kernel("auto", cuda, "cakld", 1.0, mix)
    with pytest.raises(ValueError, match="JSD and CAKLD with 0 < β < 1 use the PyTorch chunk"):
        _use_kernel("triton", cuda, "cakld", 0.3, mix)


@pytest.mark.parametrize("kind,beta,reverse", [("forward_kl", 0.5, False), ("reverse_kl", 0.5, True),
                                               ("cakld", 0.0, False), ("cakld", 1.0, True), ("jsd", 1.0, True)])
def test_kernel_gets_the_direction_of_the_loss_it_stands_for(monkeypatch, kind, beta, reverse):
    """CAKLD (or JSD) at β = 1 is reverse KL: the kernel must be told so, not run forward KL."""
    from hf_sdft.trainer import kd_triton

    seen = []

    def chunk(z_s, z_t, y, w_kd, mix, *, reverse, temperature):
        seen.append(reverse)
        return torch.zeros(z_s.shape[0]), torch.zeros(z_s.shape[0])

    monkeypatch.setattr(kd_triton, "available", lambda device: True)
    monkeypatch.setattr(kd_triton, "kd_ce_chunk", chunk)
    hs, ws, _, ht, wt, _, labels = problem(bias=False)
    fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, loss_type=kind, beta=beta, chunk_size=8)
    assert seen and set(seen) == {reverse}
