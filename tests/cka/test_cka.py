"""CKA against numpy references written here from the papers' definitions."""

import numpy as np
import pytest
import torch

from hf_sdft.cka.metric import MinibatchCKA, cka_from_grams, linear_cka, rbf_cka


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
