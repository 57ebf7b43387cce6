"""The fused distillation loss: the output heads applied inside the loss, chunk by chunk, so the
``(N, V)`` logits never exist (:func:`fused_linear_distillation_loss`, the trainers'
:func:`fused_linear_kd_ce_loss`), its autograd function (:class:`_FusedLinearDistillation`) and
the choice of the chunk's kernel (PyTorch, or Triton's :mod:`hf_sdft.trainer.kd_triton`) and of
its size within a memory budget (:func:`fused_chunk_size`), and the supervised rows found on the
host off the critical path (:class:`HostRowIndex`). The divergences themselves are the pure
functions of :mod:`hf_sdft.trainer.losses`."""

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
    chunk_memory: int | None = None
    kept_rows: torch.Tensor | None = None
    head_grad_in_place: bool = False
    student_head_bias: torch.Tensor | None = None
    teacher_head_bias: torch.Tensor | None = None
    kernel: str = "auto"


class HostRowIndex:
    """The indices of the rows a boolean ``keep`` (n,) marks, found without stopping the GPU: made
    at the start of a step, before the forwards are queued, it queues ``keep``'s copy into pinned
    host memory; :meth:`rows`, called after the forwards, waits for that copy only (long done by
    then), finds the rows on the host and queues them back. On the CPU it finds them at once. The
    fused loss takes them as ``kept_rows`` instead of its own ``nonzero``, which would wait for
    everything queued before it: the teacher's and the student's whole forwards."""

    def __init__(self, keep: torch.Tensor):
        self.device = keep.device
        self.copied = None
        if keep.is_cuda:
            self.host = torch.empty(keep.shape, dtype=torch.bool, pin_memory=True)
            self.host.copy_(keep, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(keep.device))  # the stream the copy was queued on
        else:
            self.index = keep.nonzero()[:, 0]

    def rows(self) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
            self.index = self.host.nonzero()[:, 0].pin_memory().to(self.device, non_blocking=True)
            self.copied = None
        return self.index


@dataclass(frozen=True)
class _Run:
    """What the autograd function's pass needs besides tensors: the divergence, the chunk, the
    ``mix`` weights ``(kd, ce)`` (None: two differentiable outputs), whether to build gradients,
    whether the chunks run the Triton kernel, and whether the head's gradient may be added into
    its ``.grad`` by the backward itself."""

    loss_type: str
    beta: float
    temperature: float
    chunk: int
    mix: tuple | None
    build: bool
    use_kernel: bool
    in_place: bool = False


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


def fused_chunk_size(n: int, vocab: int, hidden: int, kernel: bool = False, *, row_bytes: int | None = None,
                     budget: int | None = None) -> int:
    """Positions per chunk of the fused loss: the fastest size, made smaller where a chunk's
    buffers (``row_bytes`` per position, :func:`chunk_row_bytes`) would exceed ``budget`` bytes.

    Fastest, PyTorch chunk: a chunk's (rows, V) logits about as large as the (n, hidden) hidden
    states, and at least max(32, hidden / 4) rows. Each chunk reads both (V, hidden) head weights and
    adds to the head's gradient, so fewer rows would make the pass memory-bound (timings in
    ``benchmarks/costs.md``); a 256-row chunk's float32 logits are a quarter of the head weight's size.

    Fastest, Triton chunk (``kernel``): hidden / 2 rows (at least 256), so that the chunk's two
    half-precision logit blocks are half the size of a half-precision head weight: the (V, H)
    gradient update of each chunk, the pass's memory-bound part, is then spread over enough rows,
    and the loss's peak stays near Liger's.
    """
    rows = max(256, hidden // 2) if kernel else max(32, hidden // 4, -(-n * hidden // vocab))
    if budget is not None and row_bytes:
        rows = min(rows, max(_MIN_CHUNK_ROWS, budget // row_bytes))
    return max(1, min(rows, n))


_MIN_CHUNK_ROWS = 8  # below this the (V, H) gradient update, once per chunk, is all the pass does
# float32 (rows, V) buffers alive at a PyTorch chunk's peak, per divergence: the logits' log-softmaxes,
# probabilities and gradient (counted with the allocation trace of tests/trainer/test_chunk_memory.py)
_TORCH_CHUNK_FLOATS = {"forward_kl": 6, "reverse_kl": 7, "cakld": 7, "jsd": 11}
_ROW_VECTOR_BYTES = 64  # a chunk's (rows,) vectors per row: divergence, NLL, labels, weights, with room
_FREE_MEMORY_SHARE = 0.5  # of the device's free memory for one chunk: the rest absorbs fragmentation


def chunk_row_bytes(vocab: int, compute_dtype: torch.dtype, kernel: bool, loss_type: str = "forward_kl",
                    beta: float = 0.5, temperature: float = 1.0) -> int:
    """Bytes one position of a chunk holds at the chunk's peak: the Triton chunk's two logit rows in
    the matmul dtype (it writes the gradient over the student's), or the PyTorch chunk's float32
    rows (one more where the temperature is not 1: the CE's log-probabilities at 1), and the
    chunk's per-position vectors."""
    if kernel:
        return 2 * vocab * compute_dtype.itemsize + _ROW_VECTOR_BYTES
    floats = _TORCH_CHUNK_FLOATS[_effective(loss_type, beta)] + (temperature != 1.0)
    return 4 * vocab * floats + _ROW_VECTOR_BYTES


def default_chunk_memory(device: torch.device) -> int | None:
    """The chunk's memory budget when none is given: on CUDA, half of what is free now (the driver's
    free memory and what torch's cache holds unused); elsewhere none (host memory is not the limit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(_FREE_MEMORY_SHARE * (free + cached))


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
    for rows in _row_blocks(acc.shape[0], _ACCUMULATE_BLOCKS):
        acc[rows].add_(a[rows] @ b)


def _row_blocks(n: int, blocks: int):
    """``blocks`` slices covering ``range(n)`` in order."""
    step = -(-n // blocks)
    return (slice(start, start + step) for start in range(0, n, step))


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
        ctx.heads = (None, *(_plain_leaf(t) if run.in_place else None for t in (ws, bs)))
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
        for i, head in enumerate(ctx.heads):
            if head is not None and out[i] is not None and head.grad is not None:
                _add_by_blocks(head.grad, out[i])
                out[i] = None
        out = [None if g is None else g.to(dtype) for g, dtype in zip(out, ctx.dtypes)]
        ctx.grads = ctx.heads = None
        return (*out, None, None, None, None, None, None)


_ADD_BLOCKS = 16  # row blocks of a mixed-dtype in-place add: its float32 temporaries (on CPU) are 1/16 of it


def _add_by_blocks(grad: torch.Tensor, g: torch.Tensor) -> None:
    """``grad += g`` in place, summed in ``g``'s float32 and rounded once to ``grad``'s dtype; by row
    blocks, so that where torch casts through float32 temporaries none is larger than a block."""
    if grad.dtype == g.dtype:
        grad.add_(g)
        return
    for rows in _row_blocks(grad.shape[0], _ADD_BLOCKS):
        grad[rows].add_(g[rows])


def _plain_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` when the backward may add into its ``.grad`` directly: a plain leaf tensor with no hook
    that autograd's accumulation would run (DDP's and FSDP's are not visible here: the caller
    asks for this only without them)."""
    if t is None or not t.is_leaf or not t.requires_grad or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if getattr(t, "_post_accumulate_grad_hooks", None) or getattr(t, "_backward_hooks", None):
        return None
    return t


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
    if o.kept_rows is not None:  # found by the caller, off the critical path (HostRowIndex)
        if o.kept_rows.dim() != 1 or o.kept_rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kept_rows must be a 1-D integer index of flattened positions, got "
                             f"{o.kept_rows.dtype} of shape {tuple(o.kept_rows.shape)}")
        kept = o.kept_rows.to(hs.device)
    else:  # the call's one host sync: rows nobody supervises cost nothing
        kept = (kd_rows if labelled is None else kd_rows | labelled).nonzero()[:, 0]
    if kept.numel() < hs.shape[0]:
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
    chunk = o.chunk_size
    if chunk is None:
        vocab = student_head_weight.shape[0]
        budget = o.chunk_memory if o.chunk_memory is not None else default_chunk_memory(hs.device)
        row_bytes = chunk_row_bytes(vocab, _compute_dtype(hs, student_head_weight), use_kernel, loss_type, beta,
                                    temperature)
        chunk = fused_chunk_size(hs.shape[0], vocab, hs.shape[1], use_kernel, row_bytes=row_bytes, budget=budget)
    run = _Run(loss_type=loss_type, beta=beta, temperature=temperature, chunk=chunk, mix=mix,
               build=torch.is_grad_enabled(), use_kernel=use_kernel, in_place=o.head_grad_in_place)
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
        chunk_size: positions per chunk; None sizes it with :func:`fused_chunk_size`, within
            ``chunk_memory`` bytes for a chunk's buffers (None: :func:`default_chunk_memory`).
        kept_rows: the indices of the flattened positions in ``mask`` or with a label, when the
            caller has them (:class:`HostRowIndex`); None finds them here, the call's one host sync.
        head_grad_in_place: where the student head's weight (and bias) already has a ``.grad``, the
            backward adds the float32 gradient into it itself, instead of handing autograd a copy in
            the weight's dtype (a (V, H) buffer for a half-precision head). Its accumulation hooks do
            not run then: only for a single process (no DDP, FSDP or DeepSpeed), and a leaf with a
            hook is left to autograd.
        kernel: ``auto`` (the Triton chunk of :mod:`hf_sdft.trainer.kd_triton` on CUDA for forward / reverse
            KL in :func:`fused_linear_kd_ce_loss`, else PyTorch), ``triton`` (required) or ``torch``.

    Each chunk computes both heads' logits in the matmul dtype (autocast's, else the inputs'), the
    log-softmaxes and sums in float32 (KD at the temperature, CE at 1), and the gradients of the
    chunk right away, so the peak memory is a chunk of logits plus gradient buffers the size of the
    inputs. The loop never reads a value back to the host (one sync per call, to drop unsupervised
    rows, unless ``kept_rows`` are given).
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
    chunk_memory: int | None = None,
    kept_rows: torch.Tensor | None = None,
    head_grad_in_place: bool = False,
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
                           num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, chunk_memory=chunk_memory,
                           kept_rows=kept_rows, head_grad_in_place=head_grad_in_place,
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
