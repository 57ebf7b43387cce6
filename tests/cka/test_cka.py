"""CKA against numpy references written here from the papers' definitions."""

import numpy as np
import pytest
import torch

from hf_sdft.cka.metric import MinibatchCKA, cka_from_grams, linear_cka, masked_linear_cka, rbf_cka, sample_rows


def np_hsic(k, l, debiased):
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one
    ) / (n * (n - 3))


def np_cka_grams(k, l, debiased=False):
    return np_hsic(k, l, debiased) / np.sqrt(np_hsic(k, k, debiased) * np_hsic(l, l, debiased))


def np_linear_cka(x, y, debiased=False):
    """Raw (uncentered) linear kernels: centering is the estimator's job."""
    return np_cka_grams(x @ x.T, y @ y.T, debiased)


def np_rbf(x, threshold):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    med = np.median(d2[~np.eye(len(x), dtype=bool)])
    return np.exp(-d2 / (2 * threshold**2 * med))


def data(n, d1, d2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + 3.0  # offset: checks centering
    y = x @ rng.normal(size=(d1, d2)) + 0.5 * rng.normal(size=(n, d2))
    return x, y


@pytest.mark.parametrize("n,d1,d2", [(50, 6, 9), (10, 20, 30)])  # feature form, then Gram form
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_matches_reference(n, d1, d2, debiased):
    x, y = data(n, d1, d2)
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), debiased=debiased)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(np_linear_cka(x, y, debiased), rel=1e-5)


def test_debiased_differs_from_biased_on_independent_data():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 8)), rng.normal(size=(32, 8))
    biased = linear_cka(torch.tensor(x), torch.tensor(y)).item()
    unbiased = linear_cka(torch.tensor(x), torch.tensor(y), debiased=True).item()
    assert biased > 0.1  # the known small-n inflation of the biased estimator
    assert abs(unbiased) < biased / 2


@pytest.mark.parametrize("threshold", [0.5, 1.0])
@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_matches_reference(threshold, debiased):
    x, y = data(30, 5, 7, seed=2)
    got = rbf_cka(torch.tensor(x), torch.tensor(y), threshold=threshold, debiased=debiased).item()
    want = np_cka_grams(np_rbf(x, threshold), np_rbf(y, threshold), debiased)
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(linear_cka(torch.tensor(x), torch.tensor(y), debiased=debiased).item(), rel=1e-3)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_self_similarity_and_symmetry(fn):
    x, y = data(40, 6, 4, seed=3)
    tx, ty = torch.tensor(x), torch.tensor(y)
    assert fn(tx, tx).item() == pytest.approx(1.0, abs=1e-12)
    assert fn(tx, ty).item() == pytest.approx(fn(ty, tx).item(), rel=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    x, y = data(60, 8, 8, seed=4)
    tx, ty = torch.tensor(x), torch.tensor(y)
    base = linear_cka(tx, ty, debiased=debiased).item()
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(8, 8)))
    assert linear_cka(tx @ torch.tensor(q), ty, debiased=debiased).item() == pytest.approx(base, rel=1e-9)
    assert linear_cka(7.5 * tx, ty, debiased=debiased).item() == pytest.approx(base, rel=1e-9)
    # a general invertible (non-orthogonal) map changes CKA
    a = np.diag([10.0, 1, 1, 1, 1, 1, 1, 0.1]) @ np.random.default_rng(6).normal(size=(8, 8))
    assert linear_cka(tx @ torch.tensor(a), ty, debiased=debiased).item() != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
@pytest.mark.parametrize("debiased", [False, True])
def test_constant_or_zero_features_give_zero_not_nan(fn, debiased):
    x, _ = data(20, 5, 5)
    tx = torch.tensor(x, requires_grad=True)
    for degenerate in (torch.zeros(20, 5, dtype=torch.float64), torch.full((20, 5), 3.0, dtype=torch.float64)):
        value = fn(tx, degenerate, debiased=debiased)
        assert value.item() == 0.0
        if fn is linear_cka:
            value.backward()
            assert torch.isfinite(tx.grad).all()


def test_gradient_is_finite_and_raises_alignment():
    x, y = data(64, 8, 8, seed=7)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y)
    before = linear_cka(tx, ty)
    before.backward()
    assert torch.isfinite(tx.grad).all()
    stepped = linear_cka((tx + 0.5 * tx.grad).detach(), ty)
    assert stepped.item() > before.item()


def test_errors():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="debiased CKA needs at least 4 examples"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="probe set is empty"):
        MinibatchCKA(2, 2).compute()


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n", [30, 5])  # feature form (n > d), Gram form
def test_minibatch_single_batch_equals_full(debiased, n):
    xs = [torch.tensor(data(n, 6, 6, seed=s)[0]) for s in range(3)]
    ys = [torch.tensor(data(n, 6, 5, seed=s)[1]) for s in range(3)]
    mb = MinibatchCKA(3, 3, debiased=debiased)
    mb.update(xs, ys)
    full = torch.stack([torch.stack([linear_cka(x, y, debiased=debiased) for y in ys]) for x in xs])
    torch.testing.assert_close(mb.matrix(), full)
    torch.testing.assert_close(mb.compute(), torch.diagonal(full))


def test_minibatch_accumulates_unbiased_hsic_like_the_reference():
    rng = np.random.default_rng(8)
    batches = [data(n, 5, 4, seed=int(s)) for n, s in zip((12, 20, 9), rng.integers(0, 100, 3))]
    mb = MinibatchCKA(1, 1, debiased=True)
    for x, y in batches:
        mb.update([torch.tensor(x)], [torch.tensor(y)])
    sxy = sum(np_hsic(x @ x.T, y @ y.T, True) for x, y in batches)
    sxx = sum(np_hsic(x @ x.T, x @ x.T, True) for x, _ in batches)
    syy = sum(np_hsic(y @ y.T, y @ y.T, True) for _, y in batches)
    assert mb.compute().item() == pytest.approx(sxy / np.sqrt(sxx * syy), rel=1e-9)
    # the same model on both sides gives 1 however the probe set is split
    same = MinibatchCKA(1, 1)
    for x, _ in batches:
        same.update([torch.tensor(x)], [torch.tensor(x)])
    assert same.compute().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_per_layer_accumulator_equals_the_matrix_diagonal(debiased):
    xs = [torch.tensor(data(20, 4, 4, seed=s)[0]) for s in range(3)]
    ys = [torch.tensor(data(20, 4, 3, seed=s)[1]) for s in range(3)]
    full, diag = MinibatchCKA(3, 3, debiased=debiased), MinibatchCKA(3, 3, debiased=debiased, cross_layers=False)
    for _ in range(2):
        full.update(xs, ys), diag.update(xs, ys)
    torch.testing.assert_close(diag.compute(), torch.diagonal(full.matrix()))
    with pytest.raises(ValueError, match="cross_layers=False: use compute"):
        diag.matrix()


def test_cka_from_grams_matches_reference():
    x, y = data(15, 4, 4, seed=9)
    got = cka_from_grams(torch.tensor(x @ x.T), torch.tensor(y @ y.T)).item()
    assert got == pytest.approx(np_linear_cka(x, y), rel=1e-9)


@pytest.mark.parametrize("n", [300, 6])  # feature form, Gram form
def test_float32_cka_matches_float64_values_and_gradients(n):
    x, y = (torch.tensor(a, dtype=torch.float32) * 20 for a in data(n, 8, 8, seed=4))
    got, ref = (linear_cka(x.clone().requires_grad_(), y, dtype=dt) for dt in (torch.float32, torch.float64))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), abs=1e-5)
    gx32 = torch.autograd.grad(linear_cka(x32 := x.clone().requires_grad_(), y, dtype=torch.float32), x32)[0]
    gx64 = torch.autograd.grad(linear_cka(x64 := x.double().requires_grad_(), y), x64)[0]
    torch.testing.assert_close(gx32.double(), gx64, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------- the training loss's CKA (issue 27)


def related_pair(n=300, d1=24, d2=16, seed=0):
    """Two representations sharing structure, with non-zero means (centring matters) and a few
    large features (as hidden states have)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    x = z @ torch.randn(8, d1, generator=g) + 0.5 * torch.randn(n, d1, generator=g) + 3.0
    y = z @ torch.randn(8, d2, generator=g) + 0.8 * torch.randn(n, d2, generator=g) - 1.0
    x[:, 0] *= 40.0
    keep = torch.rand(n, generator=g) > 0.3
    return x, y, keep


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_masked_cka_equals_the_float64_measure_on_the_kept_rows(dtype, tol):
    x, y, keep = related_pair()
    want = linear_cka(x[keep], y[keep], dtype=torch.float64).item()
    assert 0.2 < want < 0.95
    got = masked_linear_cka(x, y, keep.float(), dtype=dtype).item()
    assert got == pytest.approx(want, abs=tol)
    # the gradient too (what training follows), against float64 autograd on the kept rows
    xa = x.clone().requires_grad_(True)
    masked_linear_cka(xa, y, keep.float(), dtype=dtype).backward()
    xb = x.double().clone().requires_grad_(True)
    linear_cka(xb[keep], y.double()[keep]).backward()
    assert torch.allclose(xa.grad.double(), xb.grad, rtol=0, atol=tol * xb.grad.abs().max().item())
    assert xa.grad[~keep].abs().max() == 0  # dropped rows take no part


def test_masked_cka_refuses_float16_and_bad_shapes():
    x, y, keep = related_pair(n=10)
    with pytest.raises(ValueError, match="float16 overflows"):
        masked_linear_cka(x, y, keep.float(), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\(N, d1\), \(N, d2\) and \(N,\) weights"):
        masked_linear_cka(x, y[:5], keep.float())


def test_sample_rows_takes_only_kept_rows_and_pads_with_weight_zero():
    keep = torch.zeros(100, dtype=torch.bool)
    keep[::4] = True  # 25 kept
    index, weight = sample_rows(keep, 10, torch.Generator().manual_seed(0))
    assert index.shape == weight.shape == (10,) and keep[index].all() and weight.sum() == 10
    assert len(set(index.tolist())) == 10
    index, weight = sample_rows(keep, 40, torch.Generator().manual_seed(0))  # more than kept: all 25, 15 at weight 0
    assert weight.sum() == 25 and set(index[weight > 0].tolist()) == set(torch.nonzero(keep).flatten().tolist())
    counts = torch.zeros(100)  # uniform over the kept rows
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        counts[sample_rows(keep, 5, g)[0]] += 1
    assert counts[~keep].sum() == 0 and counts[keep].min() > 40 and counts[keep].max() < 130  # expected 80 each


def test_a_sampled_cka_estimates_the_full_one():
    """Subsampling rows gives the full CKA within a spread that shrinks with the sample (the
    biased estimator's small-sample bias included)."""
    x, y, _ = related_pair(n=4000, seed=3)
    keep = torch.ones(4000, dtype=torch.bool)
    full = masked_linear_cka(x, y, keep.float()).item()
    g = torch.Generator().manual_seed(0)
    spread = {}
    for k in (256, 1024):
        draws = []
        for _ in range(30):
            index, weight = sample_rows(keep, k, g)
            draws.append(masked_linear_cka(x[index], y[index], weight).item())
        spread[k] = max(abs(d - full) for d in draws)
    assert spread[1024] < spread[256] < 0.1 and spread[1024] < 0.05, spread
