"""distillation_loss against numpy reference formulas written here, independently."""

import numpy as np
import pytest
import torch

from hf_sdft.trainer.losses import distillation_loss, label_logprobs, mean_label_probability, token_cross_entropy


def np_softmax(z, t=1.0):
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_divergence(s, t, kind, beta=0.5, temp=1.0):
    ps, pt = np_softmax(s, temp), np_softmax(t, temp)
    if kind == "forward_kl":
        d = np_kl(pt, ps)
    elif kind == "reverse_kl":
        d = np_kl(ps, pt)
    elif kind == "cakld":  # BitDistiller eq.: γ·KL(p_S‖p_T) + (1 − γ)·KL(p_T‖p_S), γ passed as beta
        d = beta * np_kl(ps, pt) + (1 - beta) * np_kl(pt, ps)
    else:
        m = beta * pt + (1 - beta) * ps
        d = (beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)) / (beta * (1 - beta))
    return d * temp**2


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "cakld"])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_matches_reference(logits, kind, temp):
    s, t = logits
    got = distillation_loss(s, t, loss_type=kind, beta=0.3, temperature=temp)
    want = np_divergence(s.numpy(), t.numpy(), kind, beta=0.3, temp=temp).mean()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_temperature_scaling_is_t_squared_times_softened_kl(logits):
    s, t = logits
    got = distillation_loss(s, t, temperature=4.0).item()
    soft = np_kl(np_softmax(t.numpy() / 4.0), np_softmax(s.numpy() / 4.0)).mean()
    assert got == pytest.approx(16.0 * soft, rel=1e-5)


def test_jsd_is_continuous_at_both_ends(logits):
    s, t = logits
    fkl = distillation_loss(s, t, loss_type="forward_kl").item()
    rkl = distillation_loss(s, t, loss_type="reverse_kl").item()
    assert fkl != pytest.approx(rkl, rel=1e-2)  # the two limits really differ here
    for b, limit in [(1e-6, fkl), (1 - 1e-6, rkl)]:  # slope at the ends ~ chi-square divergence
        assert distillation_loss(s, t, loss_type="jsd", beta=b).item() == pytest.approx(limit, rel=1e-3)
    assert distillation_loss(s, t, loss_type="jsd", beta=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert distillation_loss(s, t, loss_type="jsd", beta=1.0).item() == pytest.approx(rkl, rel=1e-6)
    # approaching the ends, the error keeps shrinking: no jump
    errs = [abs(distillation_loss(s, t, loss_type="jsd", beta=b).item() - fkl) for b in (1e-1, 1e-2, 1e-3)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("chunk", [None, 4])
def test_cakld_values_and_gradients_equal_a_direct_implementation(logits, gamma, chunk):
    s, t = logits
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(5)) > 0.25
    leaf = s.clone().requires_grad_()
    got = distillation_loss(leaf, t, mask, loss_type="cakld", beta=gamma, temperature=1.5, chunk_size=chunk)
    got.backward()
    ref_leaf = s.double().requires_grad_()  # the paper's formula on full logits, float64 autograd
    ps, pt = torch.softmax(ref_leaf / 1.5, -1), torch.softmax(t.double() / 1.5, -1)
    reverse, forward = (ps * (ps.log() - pt.log())).sum(-1), (pt * (pt.log() - ps.log())).sum(-1)
    want = ((gamma * reverse + (1 - gamma) * forward)[mask].mean() * 1.5**2)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-7)


def test_cakld_ends_are_forward_and_reverse_kl_exactly(logits):
    s, t = logits
    fkl = distillation_loss(s, t, loss_type="forward_kl")
    rkl = distillation_loss(s, t, loss_type="reverse_kl")
    assert fkl.item() != pytest.approx(rkl.item(), rel=1e-2)
    assert torch.equal(distillation_loss(s, t, loss_type="cakld", beta=0.0), fkl)
    assert torch.equal(distillation_loss(s, t, loss_type="cakld", beta=1.0), rkl)
    mid = distillation_loss(s, t, loss_type="cakld", beta=0.25).item()  # linear in γ in between
    assert mid == pytest.approx(0.25 * rkl.item() + 0.75 * fkl.item(), rel=1e-6)


def test_cakld_gamma_terms_equal_the_papers_average(logits):
    """γ = E_(x,y)[1/|y| Σ_i p_T(y_i | x, y_<i)]: per sequence the mean teacher probability of its
    labels, then the mean over sequences (a sequence without labels does not count)."""
    _, t = logits
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
    labels[0, :3] = -100
    labels[2] = -100
    for temp in (1.0, 2.0):
        for head in (False, True):
            if head:  # from the head's input: logits = h @ Wᵀ + b, chunk by chunk
                g = torch.Generator().manual_seed(7)
                h, w, b = torch.randn(3, 5, 4, generator=g), torch.randn(11, 4, generator=g), torch.randn(11, generator=g)
                z = h @ w.T + b
                lp = label_logprobs(h, labels, head_weight=w, head_bias=b, temperature=temp, chunk_size=2)
            else:
                z = t
                lp = label_logprobs(t, labels, temperature=temp, chunk_size=2)
            p = np_softmax(z.numpy(), temp)
            per_seq = [np.mean([p[b_, i, labels[b_, i]] for i in range(5) if labels[b_, i] != -100])
                       for b_ in range(2)]
            total, count = mean_label_probability(lp, labels)
            assert count.item() == 2
            assert (total / count).item() == pytest.approx(np.mean(per_seq), rel=1e-5)
            assert torch.isinf(lp[labels == -100]).all()


def test_mask_excludes_positions(logits):
    s, t = logits
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    mask[2, 4] = True
    got = distillation_loss(s, t, mask).item()
    per = np_divergence(s.numpy(), t.numpy(), "forward_kl")
    assert got == pytest.approx(per[mask.numpy()].mean(), rel=1e-5)
    # changing a masked-out position changes nothing
    s2 = s.clone()
    s2[1, 3] += 10
    assert distillation_loss(s2, t, mask).item() == pytest.approx(got, rel=1e-6)


def test_num_items_in_batch_gives_sum_over_count(logits):
    s, t = logits
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    per = np_divergence(s.numpy(), t.numpy(), "jsd")
    got = distillation_loss(s, t, mask, loss_type="jsd", num_items_in_batch=40).item()
    assert got == pytest.approx(per[mask.numpy()].sum() / 40, rel=1e-5)


def test_gradient_accumulation_equals_full_batch(logits):
    """Two micro-batches normalised by the global count sum to the full-batch loss."""
    s, t = logits
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    full = distillation_loss(s, t, mask)
    n = int(mask.sum())
    halves = distillation_loss(s[:1], t[:1], mask[:1], num_items_in_batch=n) + distillation_loss(
        s[1:], t[1:], mask[1:], num_items_in_batch=n
    )
    assert halves.item() == pytest.approx(full.item(), rel=1e-6)


def test_bf16_teacher_fp32_student_never_negative():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(64, 50, generator=g) * 8
    s = t.to(torch.bfloat16).float()  # a near-copy: divergences are tiny, rounding must not go negative
    for kind in ("forward_kl", "reverse_kl", "jsd", "cakld"):
        per_pos = distillation_loss(s, t.to(torch.bfloat16), loss_type=kind)
        assert per_pos.item() >= 0.0
        got = distillation_loss(s[:4], t[:4].to(torch.bfloat16), loss_type=kind).item()
        want = np_divergence(s[:4].numpy(), t[:4].to(torch.bfloat16).float().numpy(), kind).mean()
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "cakld"])
def test_chunked_equals_unchunked_value_and_grad(logits, kind):
    s, t = logits
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.2
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = distillation_loss(s1, t, mask, loss_type=kind)
    b = distillation_loss(s2, t, mask, loss_type=kind, chunk_size=2)
    a.backward(), b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_fully_masked_batch_is_zero_with_gradient(logits):
    s, t = logits
    s = s.clone().requires_grad_()
    loss = distillation_loss(s, t, torch.zeros(3, 5, dtype=torch.bool), loss_type="jsd")
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert s.grad is not None and torch.all(s.grad == 0)
    ce = token_cross_entropy(s, torch.full((3, 5), -100))
    assert ce.item() == 0.0 and ce.requires_grad


def test_banned_tokens_with_minus_inf_logits_give_no_nan(logits):
    s, t = logits
    s, t = s.clone().requires_grad_(), t.clone()
    t[..., 0] = float("-inf")  # the teacher bans token 0; the student does not
    for kind in ("forward_kl", "jsd"):  # finite: the teacher's zero mass adds nothing
        loss = distillation_loss(s, t, loss_type=kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None
    assert not torch.isnan(distillation_loss(s, t, loss_type="reverse_kl"))  # KL(p_S||p_T) really is +inf here
    s2 = s.detach().clone()
    s2[..., 0] = float("-inf")
    for kind in ("forward_kl", "reverse_kl", "jsd"):  # both ban it: equal to the reference without that token
        got = distillation_loss(s2, t, loss_type=kind).item()
        want = np_divergence(s2.numpy()[..., 1:], t.numpy()[..., 1:], kind).mean()
        assert got == pytest.approx(want, rel=1e-5)


def test_identical_distributions_give_zero(logits):
    s, _ = logits
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert distillation_loss(s, s.clone(), loss_type=kind).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, s.clone(), loss_type="cakld", beta=0.4).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_matches_reference(logits):
    s, _ = logits
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(4))
    labels[0, 0] = -100
    p = np_softmax(s.numpy())
    keep = labels.numpy() != -100
    nll = -np.log(np.take_along_axis(p, np.where(keep, labels.numpy(), 0)[..., None], -1)[..., 0])
    assert token_cross_entropy(s, labels).item() == pytest.approx(nll[keep].mean(), rel=1e-5)


def test_errors():
    s = torch.randn(2, 7)
    with pytest.raises(ValueError, match="vocabularies differ: student has 7 logits, teacher 9"):
        distillation_loss(s, torch.randn(2, 9))
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'.*forward_kl, reverse_kl, jsd, cakld"):
        distillation_loss(s, s, loss_type="kl")
    with pytest.raises(ValueError, match="mask shape"):
        distillation_loss(s, s, torch.ones(3, dtype=torch.bool))
