"""Centered Kernel Alignment (Kornblith et al. 2019) between two representations.

Rows are examples (here: tokens), columns are features. All accumulation is in float64.
HSIC estimators: biased ⟨HKH, HLH⟩/(n−1)², or the unbiased estimator of Song et al. (2012)
with ``debiased=True`` (needs n ≥ 4). CKA = HSIC(K,L) / sqrt(HSIC(K,K)·HSIC(L,L)).

Degenerate input: when either representation has no variance (constant or zero features,
or a debiased self-HSIC that is ≤ 0 on a tiny sample), CKA is defined as 0 — there is no
geometry to align — and the gradient is finite (zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_sdft.distributed import all_reduce_sum

_REL_EPS = 1e-24  # self-HSIC below this fraction of the raw scale counts as "no variance"


def _check_pair(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"CKA expects 2-D (examples, features) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples on both sides: {x.shape[0]} vs {y.shape[0]} rows")
    min_n = 4 if debiased else 2
    if x.shape[0] < min_n:
        raise ValueError(
            f"{'debiased ' if debiased else ''}CKA needs at least {min_n} examples (rows), got {x.shape[0]}"
        )


def _safe_ratio(hxy, hxx, hyy, scale_x, scale_y) -> torch.Tensor:
    valid = (hxx > _REL_EPS * scale_x) & (hyy > _REL_EPS * scale_y)
    denom = torch.sqrt((hxx * hyy).clamp(min=torch.finfo(hxx.dtype).tiny))
    return torch.where(valid, hxy / denom, torch.zeros_like(hxy))


def _unbiased_from_grams(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC for stacks of zero-diagonal Grams ``k (A, n, n)``, ``l (B, n, n)`` → ``(A, B)``."""
    n = k.shape[-1]
    trace_term = k.flatten(1) @ l.flatten(1).T
    sum_term = torch.outer(k.sum((1, 2)), l.sum((1, 2))) / ((n - 1) * (n - 2))
    row_term = k.sum(2) @ l.sum(2).T * (2.0 / (n - 2))
    return (trace_term + sum_term - row_term) / (n * (n - 3))


def _zero_diag(k: torch.Tensor) -> torch.Tensor:
    return k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))


def _center_gram(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _hsic_pair(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC between two ``(n, n)`` Grams (raw kernels, not centered)."""
    if debiased:
        return _unbiased_from_grams(_zero_diag(k)[None], _zero_diag(l)[None])[0, 0]
    n = k.shape[0]
    return (_center_gram(k) * _center_gram(l)).sum() / (n - 1) ** 2


def _cka_grams(k, l, debiased: bool, scale_x, scale_y) -> torch.Tensor:
    hxy, hxx, hyy = _hsic_pair(k, l, debiased), _hsic_pair(k, k, debiased), _hsic_pair(l, l, debiased)
    return _safe_ratio(hxy, hxx, hyy, scale_x, scale_y)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """CKA between two ``(n, n)`` kernel matrices."""
    k, l = k.double(), l.double()
    return _cka_grams(k, l, debiased, (k**2).sum() / k.shape[0] ** 2, (l**2).sum() / l.shape[0] ** 2)


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Linear CKA between ``x (n, d1)`` and ``y (n, d2)``; a differentiable scalar computed in
    ``dtype`` (float64 for measurements; the trainers' CKA loss uses float32, several times faster
    on CPU and GPU and within 1e-5 of it).

    Uses the feature-space form ‖YᵀX‖²_F / (‖XᵀX‖_F‖YᵀY‖_F) on centered features when
    n > max(d1, d2) (cost O(n·d²)), the Gram form otherwise (O(n²·d)).
    """
    _check_pair(x, y, debiased)
    n = x.shape[0]
    x, y = x.to(dtype), y.to(dtype)
    scale_x, scale_y = ((x**2).sum() / n) ** 2, ((y**2).sum() / n) ** 2
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if n <= max(x.shape[1], y.shape[1]):
        return _cka_grams(x @ x.T, y @ y.T, debiased, scale_x, scale_y)
    hsic = [_feature_hsic(a, b, debiased) for a, b in ((x, y), (x, x), (y, y))]
    return _safe_ratio(*hsic, scale_x, scale_y)


def masked_linear_cka(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Biased linear CKA between the rows of ``x (N, d1)`` and ``y (N, d2)`` that ``weight (N,)``
    (1 = a row to compare, 0 = not) keeps, with no data-dependent shape: no ``nonzero``, no
    boolean indexing, so a GPU never waits for the host. Equal to :func:`linear_cka` on the kept
    rows. Means and norms are taken in float32; the three ``(d, d)`` feature products in ``dtype``
    (bfloat16 on a GPU runs them on tensor cores, which accumulate in float32); float16 is refused
    (the products of unnormalised hidden states overflow it)."""
    if x.dim() != 2 or y.dim() != 2 or weight.shape != x.shape[:1] or y.shape[0] != x.shape[0]:
        raise ValueError(f"masked CKA expects (N, d1), (N, d2) and (N,) weights, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(weight.shape)}")
    if dtype == torch.float16:
        raise ValueError("masked CKA in float16 overflows on hidden states: use bfloat16 or float32")
    w = weight.to(torch.float32)[:, None]
    n = w.sum().clamp(min=2.0)  # fewer than 2 kept rows: no geometry, CKA 0 through _safe_ratio

    x, y = x.to(torch.float32), y.to(torch.float32)  # once: both the centring and the scales read them

    def centered(f):
        return (f - (f * w).sum(0, keepdim=True) / n) * w  # dropped rows are zero: they add nothing

    scale_x, scale_y = ((x.square() * w).sum() / n) ** 2, ((y.square() * w).sum() / n) ** 2
    low_x, low_y = centered(x).to(dtype), centered(y).to(dtype)

    def hsic(a, b):  # ‖BᵀA‖²_F / (n − 1)²: the biased estimator in feature space
        return (b.T @ a).float().square().sum() / (n - 1) ** 2

    return _safe_ratio(hsic(low_x, low_y), hsic(low_x, low_x), hsic(low_y, low_y), scale_x, scale_y)


def sample_rows(keep: torch.Tensor, k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` uniformly random rows among those ``keep (N,)`` marks, as ``(indices (k,), weight (k,))``
    with a fixed shape whatever the number kept (no host sync): the kept rows get random keys in
    [0, 1), the others 2, and the ``k`` smallest are taken; a dropped row taken (fewer than ``k``
    kept) has weight 0."""
    k = min(k, keep.shape[0])
    keys = torch.rand(keep.shape, generator=generator, device=keep.device if generator is None else generator.device)
    keys = torch.where(keep, keys.to(keep.device), torch.full_like(keys, 2.0, device=keep.device))
    index = torch.topk(keys, k, largest=False, sorted=False).indices
    return index, keep[index].to(torch.float32)


def _centered(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each ``(n, d)`` feature matrix in float64 with its column means removed."""
    feats = [f.double() for f in feats]
    return [f - f.mean(0, keepdim=True) for f in feats]


def _feature_hsic(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC of the linear kernels of centered features ``x (n, d1)``, ``y (n, d2)``
    computed in feature space, O(n·d1·d2): biased ‖YᵀX‖²/(n−1)², or the unbiased estimator.

    For the unbiased one: centered features give Grams with zero row sums, so with
    k_i = ‖x_i‖², l_i = ‖y_i‖² (the diagonals removed): tr(K̃L̃) = ‖XᵀY‖² − k·l, 1ᵀK̃1 = −Σk, K̃1 = −k.
    """
    n = x.shape[0]
    cross = (y.T @ x).square().sum()
    if not debiased:
        return cross / (n - 1) ** 2
    k, l = x.square().sum(1), y.square().sum(1)
    dot = k @ l
    return (cross - dot + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * dot / (n - 2)) / (n * (n - 3))


def rbf_gram(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Gaussian-kernel Gram ``(n, n)`` with bandwidth σ = threshold · sqrt(median squared distance).

    The median is over distinct pairs i ≠ j. Constant features give the all-ones Gram.
    """
    x = x.double()
    sq = x.square().sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp(min=0.0)
    n = x.shape[0]
    off_diag = dist2[~torch.eye(n, dtype=torch.bool, device=x.device)]
    sigma2 = (threshold**2 * off_diag.median()).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.exp(-dist2 / (2.0 * sigma2))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, *, threshold: float = 1.0, debiased: bool = False) -> torch.Tensor:
    """RBF-kernel CKA between ``x (n, d1)`` and ``y (n, d2)``; a float64 scalar."""
    _check_pair(x, y, debiased)
    return cka_from_grams(rbf_gram(x, threshold), rbf_gram(y, threshold), debiased=debiased)


class MinibatchCKA:
    """Linear CKA over a probe set too large for memory (Nguyen et al. 2021).

    Each :meth:`update` adds one minibatch's HSIC estimates for every pair of layers;
    CKA = ΣHSIC(X,Y) / sqrt(ΣHSIC(X,X)·ΣHSIC(Y,Y)). With ``debiased=True`` (the paper's
    choice) each minibatch uses the unbiased estimator, so the sum is an unbiased estimate
    whatever the minibatch sizes; with one minibatch it equals :func:`linear_cka`.

    Args:
        num_x, num_y: how many layers each side has (rows / columns of :meth:`matrix`).
        cross_layers: accumulate every (x-layer, y-layer) pair for :meth:`matrix`; when False
            only layer i ↔ layer i, for :meth:`compute` (num_x == num_y).
    """

    def __init__(self, num_x: int, num_y: int, *, debiased: bool = True, cross_layers: bool = True):
        if not cross_layers and num_x != num_y:
            raise ValueError("per-layer CKA (cross_layers=False) needs as many layers on both sides")
        self.debiased = debiased
        self.cross_layers = cross_layers
        self.hsic_xy = torch.zeros(num_x, num_y, dtype=torch.float64)
        self.hsic_xx = torch.zeros(num_x, dtype=torch.float64)
        self.hsic_yy = torch.zeros(num_y, dtype=torch.float64)
        self.scale_x = torch.zeros(num_x, dtype=torch.float64)
        self.scale_y = torch.zeros(num_y, dtype=torch.float64)
        self.num_examples = 0

    def _grams(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        k = torch.stack([f @ f.T for f in _centered(feats)]).cpu()
        return _zero_diag(k) if self.debiased else k  # centered features give centered Grams

    @torch.no_grad()
    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: ``xs[i] (n, d_i)`` and ``ys[j] (n, e_j)`` over the same n rows."""
        if len(xs) != self.hsic_xy.shape[0] or len(ys) != self.hsic_xy.shape[1]:
            raise ValueError(f"expected {tuple(self.hsic_xy.shape)} layers, got {len(xs)} and {len(ys)}")
        _check_pair(xs[0], ys[0], self.debiased)
        n = xs[0].shape[0]
        if n > max(f.shape[1] for f in (*xs, *ys)):  # feature form: O(n·d²) per pair instead of O(n²·d)
            self._update_features(xs, ys)
            return
        kx, ky = self._grams(xs), self._grams(ys)
        if self.debiased:
            hsic = _unbiased_from_grams
        else:
            def hsic(a, b):
                return a.flatten(1) @ b.flatten(1).T / (n - 1) ** 2

        if self.cross_layers:
            self.hsic_xy += hsic(kx, ky)
        else:
            self.hsic_xy += torch.diag(torch.stack([hsic(a[None], b[None])[0, 0] for a, b in zip(kx, ky)]))
        self.hsic_xx += torch.stack([hsic(k[None], k[None])[0, 0] for k in kx])
        self.hsic_yy += torch.stack([hsic(k[None], k[None])[0, 0] for k in ky])
        self._add_scales(xs, ys)

    def _update_features(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        cx, cy = _centered(xs), _centered(ys)

        def hsic(a, b):
            return _feature_hsic(a, b, self.debiased)

        if self.cross_layers:
            self.hsic_xy += torch.stack([torch.stack([hsic(a, b) for b in cy]) for a in cx]).cpu()
        else:
            self.hsic_xy += torch.diag(torch.stack([hsic(a, b) for a, b in zip(cx, cy)])).cpu()
        self.hsic_xx += torch.stack([hsic(a, a) for a in cx]).cpu()
        self.hsic_yy += torch.stack([hsic(b, b) for b in cy]).cpu()
        self._add_scales(xs, ys)

    def _add_scales(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        n = xs[0].shape[0]
        self.scale_x += torch.stack([(f.double() ** 2).sum().cpu() / n for f in xs]) ** 2
        self.scale_y += torch.stack([(f.double() ** 2).sum().cpu() / n for f in ys]) ** 2
        self.num_examples += n

    def all_reduce(self) -> None:
        """Sum the accumulators over processes (each process fed different minibatches)."""
        count = torch.tensor([float(self.num_examples)], dtype=torch.float64)
        for t in (self.hsic_xy, self.hsic_xx, self.hsic_yy, self.scale_x, self.scale_y, count):
            all_reduce_sum(t)
        self.num_examples = int(count.item())

    def matrix(self) -> torch.Tensor:
        """CKA for every (x-layer, y-layer) pair, ``(num_x, num_y)``."""
        if self.num_examples == 0:
            raise ValueError("MinibatchCKA has seen no minibatch: the probe set is empty")
        if not self.cross_layers:
            raise ValueError("this MinibatchCKA was built with cross_layers=False: use compute()")
        return self._ratio()

    def _ratio(self) -> torch.Tensor:
        return _safe_ratio(
            self.hsic_xy, self.hsic_xx[:, None], self.hsic_yy[None, :], self.scale_x[:, None], self.scale_y[None, :]
        )

    def compute(self) -> torch.Tensor:
        """Per-layer CKA between x-layer i and y-layer i, ``(num_layers,)``."""
        if self.hsic_xy.shape[0] != self.hsic_xy.shape[1]:
            raise ValueError("per-layer CKA needs as many layers on both sides; use matrix()")
        if self.num_examples == 0:
            raise ValueError("MinibatchCKA has seen no minibatch: the probe set is empty")
        return torch.diagonal(self._ratio())
