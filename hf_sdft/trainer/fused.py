"""The fused distillation loss: the output heads applied inside the loss, chunk by chunk, so the
``(N, V)`` logits never exist (:func:`fused_linear_distillation_loss`, the trainers'
:func:`fused_linear_kd_ce_loss`), its autograd function (:class:`_FusedLinearDistillation`) and
the choice of the chunk's kernel (PyTorch, or Triton's :mod:`hf_sdft.trainer.kd_triton`). The
divergences themselves are the pure functions of :mod:`hf_sdft.trainer.losses`."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_sdft.modeling import check_vocabularies
from hf_sdft.trainer import kd_triton
from hf_sdft.trainer.losses import _effective, _log_ratios_to_mixture, _reduce, check_loss_type, log_probs

KERNELS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class FusedOptions:
    """The keyword options of :func:`fused_linear_distillation_loss` and
    :func:`fused_linear_kd_ce_loss`, travelling as one object."""

    loss_type: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    num_items_in_batch: int | torch.Tensor | None = None
    chunk_size: int | None = None
    student_head_bias: torch.Tensor | None = None
    teacher_head_bias: torch.Tensor | None = None
    kernel: str = "auto"


@dataclass(frozen=True)
class _Run:
    """What the autograd function's pass needs besides tensors: the divergence, the chunk, the
    ``mix`` weights ``(kd, ce)`` (None: two differentiable outputs), whether to build gradients,
    and whether the chunks run the Triton kernel."""

    loss_type: str
    beta: float
    temperature: float
    chunk: int
    mix: tuple | None
    build: bool
    use_kernel: bool


def _divergence_and_gradient(log_s: torch.Tensor, log_t: torch.Tensor, loss_type: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence ``(n,)`` and its gradient ``(n, V)`` with respect to the student's
    tempered logits, from float32 log-probabilities ``(n, V)`` (formulas of :func:`token_divergence`).

    Every divergence has the gradient p_S ⊙ (a − ⟨a⟩_{p_S}) with a = ∂D/∂p_S: −p_T/p_S (forward KL,
    which simplifies to p_S − p_T), log p_S − log p_T (reverse KL), log(p_S/M)/β (JSD); CAKLD's is
    γ·(reverse KL's) + (1 − γ)·(forward KL's). The KL forms work in place, with at most three
    (n, V) buffers besides the inputs.
    """
    loss_type = _effective(loss_type, beta)
    if loss_type == "forward_kl":
        p_t = log_t.exp()
        div = (log_t - log_s).mul_(p_t).sum(-1)
        return div, log_s.exp().sub_(p_t)
    if loss_type == "reverse_kl":
        a = log_s - log_t
        p_s = log_s.exp()
        div = (p_s * a).sum(-1)
        return div, a.sub_(div[:, None]).mul_(p_s)
    if loss_type == "cakld":
        a = log_s - log_t
        p_s, p_t = log_s.exp(), log_t.exp()
        reverse = torch.einsum("nv,nv->n", p_s, a)  # row dot products: no fourth (n, V) buffer
        div = beta * reverse - (1.0 - beta) * torch.einsum("nv,nv->n", p_t, a)
        grad = a.sub_(reverse[:, None]).mul_(p_s).mul_(beta)
        return div, grad.add_(p_s.sub_(p_t), alpha=1.0 - beta)
    p_s, p_t = log_s.exp(), log_t.exp()
    log_t_over_m, log_s_over_m = _log_ratios_to_mixture(log_s, log_t, beta)
    div = (p_t * log_t_over_m).sum(-1) / (1.0 - beta) + (p_s * log_s_over_m).sum(-1) / beta
    a = log_s_over_m / beta
    return div, p_s * (a - (p_s * a).sum(-1, keepdim=True))


def fused_chunk_size(n: int, vocab: int, hidden: int, kernel: bool = False) -> int:
    """Default positions per chunk of the fused loss.

    PyTorch chunk: a chunk's (rows, V) logits about as large as the (n, hidden) hidden states, and
    at least max(32, hidden / 4) rows. Each chunk reads both (V, hidden) head weights and adds to
    the head's gradient, so fewer rows would make the pass memory-bound (timings in
    ``benchmarks/costs.md``); a 256-row chunk's float32 logits are a quarter of the head weight's size.

    Triton chunk (``kernel``): hidden / 2 rows (at least 256), so that the chunk's two
    half-precision logit blocks are half the size of a half-precision head weight: the (V, H)
    gradient update of each chunk, the pass's memory-bound part, is then spread over enough rows,
    and the loss's peak stays near Liger's.
    """
    if kernel:
        return max(256, hidden // 2)
    return max(32, hidden // 4, -(-n * hidden // vocab))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of a head's matmuls: autocast's where autocast is on for the device, else the
    inputs' common dtype. Softmaxes and sums are float32 whatever this is."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


_FP32_ACCUMULATING_MM: dict[torch.device, bool] = {}  # device → addmm(..., out_dtype=float32) works there
_ACCUMULATE_BLOCKS = 8  # row blocks of the fallback's product: its temporary is 1/8 of the (V, H) gradient


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``: on CUDA with half-precision ``a`` and ``b``, one GEMM
    that accumulates into ``acc`` in float32 (no temporary); elsewhere, or where torch lacks that
    GEMM, block by block, so that no (V, H)-sized product ever exists beside ``acc``."""
    if acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda \
            and _FP32_ACCUMULATING_MM.get(acc.device, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ACCUMULATING_MM[acc.device] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without this overload
            _FP32_ACCUMULATING_MM[acc.device] = False
    step = -(-acc.shape[0] // _ACCUMULATE_BLOCKS)
    for start in range(0, acc.shape[0], step):
        acc[start:start + step].add_(a[start:start + step] @ b)


def _torch_chunk(log_s, log_t, y, w_kd, loss_type, beta, temperature, want_grads, recompute_log_p):
    """One chunk in PyTorch from float32 log-probabilities at the temperature: per-row divergence,
    per-row CE negative log-likelihood (or None) and, if ``want_grads``, ``{"kd": ..., "ce": ...}``
    gradients ``(rows, V)`` with respect to the student's logits (row weights applied)."""
    div, g_kd = _divergence_and_gradient(log_s, log_t, loss_type, beta)
    del log_t
    grads = {"kd": g_kd.mul_((w_kd / temperature)[:, None])} if want_grads else {}  # ∂D/∂z = ∂D/∂(z/T) / T
    if y is None:
        return div, None, grads
    valid = (y != -100).float()
    target = y.clamp(min=0)[:, None]
    log_p = log_s if recompute_log_p is None else recompute_log_p()
    nll = -log_p.gather(1, target)[:, 0] * valid
    if want_grads:  # softmax − one-hot, by scatter: no index op, no host sync
        g_ce = log_p.exp_() if log_p is not log_s else log_p.exp()
        grads["ce"] = g_ce.scatter_add_(1, target, -valid[:, None]).mul_(valid[:, None])
    return div, nll, grads


class _FusedLinearDistillation(torch.autograd.Function):
    """Forward computes the losses chunk by chunk and, in the same pass, their gradients with
    respect to the student's hidden states, head weight and bias; backward only scales them.

    Outputs: the KD sum, the CE sum and ``a·KD sum + b·CE sum`` for ``mix = (a, b)``. Without
    ``mix`` the first two are differentiable (one gradient buffer each); with it only the third
    (one buffer in all) and a part whose weight is 0 builds no gradient.

    Matmuls run in the autocast dtype (or the inputs'), log-softmaxes and every sum in float32;
    nothing in the chunk loop reads a value back to the host, so a GPU never waits between chunks.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, kd_row_weight, labels, run: _Run):
        mix = run.mix
        n, vocab = hs.shape[0], ws.shape[0]
        need = [run.build and t is not None and t.requires_grad for t in (hs, ws, bs)]
        f32 = dict(dtype=torch.float32, device=hs.device)
        if mix is None:
            weights = {"kd": 1.0, "ce": 1.0 if labels is not None else 0.0}
        else:
            weights = {"kd": mix[0], "ce": mix[1] if labels is not None else 0.0}
        live = [part for part, w in weights.items() if not (isinstance(w, float) and w == 0.0)]
        buffers = live if mix is None else (["mix"] if live else [])
        grads = {} if not any(need) else {
            part: [torch.zeros(n, hs.shape[1], **f32) if need[0] else None,
                   torch.zeros(vocab, hs.shape[1], **f32) if need[1] else None,
                   torch.zeros(vocab, **f32) if (bs is not None and need[2]) else None] for part in buffers}
        cs, ct = _compute_dtype(hs, ws), _compute_dtype(ht, wt)
        with contextlib.ExitStack() as stack:  # the casts below are explicit: autocast would redo them per chunk
            for device_type in {hs.device.type, ht.device.type}:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            ws_c, wt_c = ws.detach().to(cs), wt.detach().to(ct)
            bs_c = None if bs is None else bs.detach().to(cs)
            bt_c = None if bt is None else bt.detach().to(ct)
            sums = _fused_chunks(hs.detach().to(cs), ws_c, bs_c, ht.detach().to(ct), wt_c, bt_c, kd_row_weight, labels,
                                 run=run, weights=weights, live=live, grads=grads)
        ctx.grads = grads
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if mix is None:
            return sums[0], sums[1], sums.new_zeros(())
        mixed = sums.new_zeros(())
        for i, part in enumerate(("kd", "ce")):
            if part in live:
                mixed = mixed + weights[part] * sums[i]
        return sums[0], sums[1], mixed  # the caller detaches the first two

    @staticmethod
    def backward(ctx, grad_kd, grad_ce, grad_mix):
        out = [None, None, None]
        for part, scale in (("kd", grad_kd), ("ce", grad_ce), ("mix", grad_mix)):
            if part not in ctx.grads or scale is None:
                continue
            for i, g in enumerate(ctx.grads[part]):  # in place: no second copy of a (V, H) buffer
                if g is not None:
                    g.mul_(scale)
                    out[i] = g if out[i] is None else out[i].add_(g)
        out = [None if g is None else g.to(dtype) for g, dtype in zip(out, ctx.dtypes)]
        ctx.grads = None
        return (*out, None, None, None, None, None, None)


def _fused_chunks(hs, ws, bs, ht, wt, bt, kd_row_weight, labels, *, run: _Run, weights, live, grads) -> torch.Tensor:
    """The chunk loop of :class:`_FusedLinearDistillation` (inputs already in their matmul dtypes):
    returns the float32 ``[KD sum, CE sum]`` and adds every chunk's gradients into ``grads``."""
    loss_type, beta, temperature, use_kernel = run.loss_type, run.beta, run.temperature, run.use_kernel
    chunk = run.chunk
    sums = torch.zeros(2, dtype=torch.float32, device=hs.device)
    if use_kernel:
        reverse = _effective(loss_type, beta) == "reverse_kl"  # JSD / CAKLD at β = 1 too

        mix_weights = torch.stack([torch.as_tensor(weights[p], dtype=torch.float32, device=hs.device)
                                   if torch.is_tensor(weights[p]) else sums.new_full((), weights[p])
                                   for p in ("kd", "ce")])  # device scalars, read by the kernel: no host sync
    for start in range(0, hs.shape[0], chunk):
        rows = slice(start, start + chunk)
        h, w_kd = hs[rows], kd_row_weight[rows]
        y = None if labels is None else labels[rows]
        z_s = F.linear(h, ws, bs)
        z_t = F.linear(ht[rows], wt, bt).to(hs.device)
        if use_kernel:  # the mixed gradient is written over z_s
            div, nll = kd_triton.kd_ce_chunk(z_s, z_t, y, w_kd, mix_weights, reverse=reverse,
                                             temperature=temperature)
            chunk_grads = {"mix": z_s} if grads else {}
        else:
            log_t, log_s = log_probs(z_t, temperature), log_probs(z_s, temperature)
            del z_t
            recompute = None if temperature == 1.0 else (lambda: log_probs(z_s, 1.0))
            div, nll, chunk_grads = _torch_chunk(log_s, log_t, y, w_kd, loss_type, beta, temperature,
                                                 bool(grads), recompute)
            del log_s, log_t
            if "mix" in grads:  # the weighted sum, accumulated into the first live part's buffer
                first, *rest = live
                mixed_grad = chunk_grads[first].mul_(weights[first])
                for part in rest:
                    mixed_grad.add_(chunk_grads.pop(part).mul_(weights[part]))  # tensor weights: no .item()
                chunk_grads = {"mix": mixed_grad}
        sums[0] += (div * w_kd).sum()
        if nll is not None:
            sums[1] += nll.sum()
        for part, (g_h, g_w, g_b) in grads.items():
            g = chunk_grads[part].to(ws.dtype)
            if g_h is not None:
                g_h[rows] = g @ ws
            if g_w is not None:
                _accumulate_mm(g_w, g.T, h)
            if g_b is not None:
                g_b += g.sum(0, dtype=torch.float32)
    return sums


def _use_kernel(kernel: str, device: torch.device, loss_type: str, beta: float, mix) -> bool:
    """Whether the chunks run the Triton kernel (``kernel``: ``auto`` | ``triton`` | ``torch``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kd kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return False
    why = None
    if not kd_triton.available(device):
        why = f"needs triton and a CUDA device (got {device.type}{'' if kd_triton.triton else ', no triton'})"
    elif _effective(loss_type, beta) not in ("forward_kl", "reverse_kl"):
        why = "covers forward and reverse KL only (JSD and CAKLD with 0 < β < 1 use the PyTorch chunk)"
    elif mix is None:
        why = "computes the kd_ratio-weighted loss only (fused_linear_kd_ce_loss)"
    if why and kernel == "triton":
        raise ValueError(f"kd kernel 'triton' {why}: use kernel='auto' or 'torch'")
    return why is None



def _fused(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask, labels,
           options: FusedOptions, kd_ratio: float | None):
    """Checks, flattening and the fused pass shared by the two public functions: ``(kd, ce, mixed)``."""
    o = options
    loss_type, beta, temperature, num_items_in_batch, kernel = o.loss_type, o.beta, o.temperature, o.num_items_in_batch, o.kernel
    check_loss_type(loss_type)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_vocabularies(student_head_weight.shape[0], teacher_head_weight.shape[0], "rows in its output head")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"hidden-state positions differ: student {tuple(student_hidden.shape[:-1])}, "
                         f"teacher {tuple(teacher_hidden.shape[:-1])}")
    positions = student_hidden.shape[:-1]
    for name, t in (("mask", mask), ("labels", labels)):
        if t is not None and t.shape != positions:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match hidden-state positions {tuple(positions)}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    labelled = None if flat_labels is None else flat_labels != -100
    if mask is not None:
        kd_rows = mask.reshape(-1).bool()
    elif labelled is not None:
        kd_rows = labelled
    else:
        kd_rows = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device)
    kd_count = kd_rows.sum()
    ce_count = None if labelled is None else labelled.sum()
    keep = kd_rows if labelled is None else kd_rows | labelled
    kept = keep.nonzero()[:, 0]  # the call's one host sync: rows nobody supervises cost nothing
    if kept.numel() < keep.numel():
        hs, ht, kd_rows = hs.index_select(0, kept), ht.index_select(0, kept.to(ht.device)), kd_rows.index_select(0, kept)
        flat_labels = None if flat_labels is None else flat_labels.index_select(0, kept)
    one = torch.ones((), device=hs.device)  # sum → reduced loss: × kd_scale, × ce_scale
    kd_scale = _reduce(one, kd_count, num_items_in_batch) * temperature**2
    ce_scale = None if ce_count is None else _reduce(one, ce_count, num_items_in_batch)
    mix = None
    if kd_ratio is not None:
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
        ce_weight = 1.0 - kd_ratio if ce_scale is not None else 0.0
        mix = (kd_ratio * kd_scale if kd_ratio else 0.0, ce_weight * ce_scale if ce_weight else 0.0)
    use_kernel = _use_kernel(kernel, hs.device, loss_type, beta, mix)
    chunk = o.chunk_size or fused_chunk_size(hs.shape[0], student_head_weight.shape[0], hs.shape[1], use_kernel)
    run = _Run(loss_type=loss_type, beta=beta, temperature=temperature, chunk=chunk, mix=mix,
               build=torch.is_grad_enabled(), use_kernel=use_kernel)
    kd_sum, ce_sum, mixed = _FusedLinearDistillation.apply(
        hs, student_head_weight, o.student_head_bias, ht, teacher_head_weight, o.teacher_head_bias,
        kd_rows.float(), flat_labels, run,
    )
    if mix is not None:
        kd_sum, ce_sum = kd_sum.detach(), ce_sum.detach()
    return kd_sum * kd_scale, None if ce_scale is None else ce_sum * ce_scale, mixed


_FUSED_ARGS = """
    Args:
        student_hidden: ``(..., H_s)``; the student logits are ``student_hidden @ W_sᵀ + b_s``.
        student_head_weight: ``(V, H_s)``; teacher_hidden ``(..., H_t)``, teacher_head_weight ``(V, H_t)``
            (the teacher's side is never differentiated and may live on another device).
        mask: bool ``(...)``, the positions distilled (default: all, or those with a label).
        labels: ``(...)`` token ids for the cross-entropy, −100 = not supervised (no shift is done).
        chunk_size: positions per chunk; None sizes it with :func:`fused_chunk_size`.
        kernel: ``auto`` (the Triton chunk of :mod:`hf_sdft.trainer.kd_triton` on CUDA for forward / reverse
            KL in :func:`fused_linear_kd_ce_loss`, else PyTorch), ``triton`` (required) or ``torch``.

    Each chunk computes both heads' logits in the matmul dtype (autocast's, else the inputs'), the
    log-softmaxes and sums in float32 (KD at the temperature, CE at 1), and the gradients of the
    chunk right away, so the peak memory is a chunk of logits plus gradient buffers the size of the
    inputs. The loop never reads a value back to the host (one sync per call, to drop unsupervised rows).
"""


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KD (and CE) losses of the linear heads applied to hidden states, without ever building the
    ``(N, V)`` logits: ``(kd, ce)``, float32 scalars reduced as :func:`distillation_loss` and
    :func:`token_cross_entropy` (``ce`` is None without ``labels``), both differentiable (their
    gradients are kept in two buffers the size of the inputs; :func:`fused_linear_kd_ce_loss`
    keeps one).
    """
    options = FusedOptions(loss_type=loss_type, beta=beta, temperature=temperature,
                           num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                           student_head_bias=student_head_bias, teacher_head_bias=teacher_head_bias, kernel=kernel)
    kd, ce, _ = _fused(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask, labels,
                       options, None)
    return kd, ce


def fused_linear_kd_ce_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    kd_ratio: float,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The trainers' loss: ``(loss, kd, ce)`` with ``loss = kd_ratio·kd + (1 − kd_ratio)·ce`` the
    only differentiable output, its gradient built in one buffer per input (a part weighted 0
    builds none); ``kd`` and ``ce`` as :func:`fused_linear_distillation_loss` returns them,
    detached, for logging. Without ``labels`` the loss is ``kd_ratio·kd``. ``options``: the
    keyword arguments of :func:`fused_linear_distillation_loss` (``loss_type``, ``beta``, …).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(FusedOptions)}
    if unknown:
        raise TypeError(f"fused_linear_kd_ce_loss() got unexpected keyword arguments {sorted(unknown)}")
    kd, ce, loss = _fused(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask, labels,
                          FusedOptions(**options), kd_ratio)
    return loss, kd, ce


fused_linear_distillation_loss.__doc__ += _FUSED_ARGS
fused_linear_kd_ce_loss.__doc__ += _FUSED_ARGS
