"""A Triton kernel for one chunk of the fused KD + CE loss (:mod:`hf_sdft.trainer.losses`) on CUDA.

Given a chunk's student and teacher logits ``(rows, V)`` in the matmul dtype (bf16 / fp16 /
fp32), one program per row reads both rows twice — an online max / sum-of-exponentials pass,
then a gradient pass — computing in float32 and writing the gradient of
``a·w_row·KD + b·CE`` with respect to the student's logits *over* the student's logits, in
place. The pure-PyTorch chunk of :mod:`hf_sdft.trainer.losses` does the same in about twenty passes over
float32 copies; this reads the bf16 logits three times and writes them once, and allocates
nothing of size (rows, V).

Forward and reverse KL (and JSD at β = 0 or 1, which are those) are covered; general JSD uses the
PyTorch chunk. Triton ships its own compiler (no nvcc, no C++ build): the kernel compiles in
seconds on first use. With ``TRITON_INTERPRET=1`` it runs on CPU tensors (the tests do).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch does not bring triton
    triton = None

_MAX_BLOCK = 4096  # columns per step of a row's loop: 16 per thread at 8 warps, few registers, no spills


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), so CPU tensors can run the kernel."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """The kernel can run on ``device``: triton is installed and the device is CUDA (or interpreted)."""
    return triton is not None and (device.type == "cuda" or (interpreted() and device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _kd_ce_rows(zs_ptr, zt_ptr, labels_ptr, kdw_ptr, mix_ptr, div_ptr, nll_ptr, V, stride_s, stride_t, inv_t,
                    REVERSE: tl.constexpr, HAS_LABELS: tl.constexpr, UNIT_T: tl.constexpr, CE_LSE: tl.constexpr,
                    BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        zs = zs_ptr + row * stride_s
        zt = zt_ptr + row * stride_t
        # pass 1: running max m and Σ exp(x − m) of both sides at temperature T, and the running
        # Σ exp(x − m)·(x − y) of the side that weights the divergence (teacher: forward, student: reverse)
        m_s = float("-inf")
        d_s = 0.0
        m_t = float("-inf")
        d_t = 0.0
        acc = 0.0
        m_1 = float("-inf")  # the student at temperature 1, for the CE
        d_1 = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            raw = tl.load(zs + cols, mask=ok, other=float("-inf")).to(tl.float32)
            s = raw * inv_t
            t = tl.load(zt + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
            new_s = tl.maximum(m_s, tl.max(s, 0))
            new_t = tl.maximum(m_t, tl.max(t, 0))
            e_s = tl.exp(s - new_s)
            e_t = tl.exp(t - new_t)
            t_minus_s = tl.where(ok, t - s, 0.0)
            if REVERSE:
                acc = acc * tl.exp(m_s - new_s) - tl.sum(e_s * t_minus_s, 0)
            else:
                acc = acc * tl.exp(m_t - new_t) + tl.sum(e_t * t_minus_s, 0)
            d_s = d_s * tl.exp(m_s - new_s) + tl.sum(e_s, 0)
            d_t = d_t * tl.exp(m_t - new_t) + tl.sum(e_t, 0)
            m_s = new_s
            m_t = new_t
            if CE_LSE:  # labels and T ≠ 1
                new_1 = tl.maximum(m_1, tl.max(raw, 0))
                d_1 = d_1 * tl.exp(m_1 - new_1) + tl.sum(tl.exp(raw - new_1), 0)
                m_1 = new_1
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        if REVERSE:  # Σ p_S (s − t) − lse_S + lse_T
            div = acc / d_s - lse_s + lse_t
        else:  # Σ p_T (t − s) − lse_T + lse_S
            div = acc / d_t - lse_t + lse_s
        tl.store(div_ptr + row, div)
        w_kd = tl.load(kdw_ptr + row).to(tl.float32) * tl.load(mix_ptr) * inv_t  # ∂/∂z = ∂/∂(z/T) / T
        w_ce = 0.0
        target = -1
        lse_1 = lse_s
        if HAS_LABELS:
            y = tl.load(labels_ptr + row)
            valid = y >= 0  # −100: not supervised
            target = tl.where(valid, y, -1)
            if not UNIT_T:
                lse_1 = m_1 + tl.log(d_1)
            z_y = tl.load(zs + tl.where(valid, y, 0)).to(tl.float32)  # read before pass 2 overwrites the row
            tl.store(nll_ptr + row, tl.where(valid, lse_1 - z_y, 0.0))
            w_ce = tl.where(valid, tl.load(mix_ptr + 1), 0.0)
        # pass 2: the mixed gradient over the student's logits
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            raw = tl.load(zs + cols, mask=ok, other=0.0).to(tl.float32)
            s = raw * inv_t - lse_s  # log p_S
            t = tl.load(zt + cols, mask=ok, other=0.0).to(tl.float32) * inv_t - lse_t  # log p_T
            p_s = tl.exp(s)
            if REVERSE:
                g = p_s * (s - t - div)
            else:
                g = p_s - tl.exp(t)
            g = g * w_kd
            if HAS_LABELS:
                if UNIT_T:
                    p_1 = p_s
                else:
                    p_1 = tl.exp(raw - lse_1)
                g += w_ce * (p_1 - tl.where(cols == target, 1.0, 0.0))
            tl.store(zs + cols, g.to(zs_ptr.dtype.element_ty), mask=ok)


def kd_ce_chunk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                kd_row_weight: torch.Tensor, mix: torch.Tensor, *, reverse: bool, temperature: float):
    """Per-row divergence ``(rows,)`` and CE negative log-likelihood ``(rows,)`` (None without
    labels), float32; ``student_logits`` ``(rows, V)`` is overwritten with the gradient of
    ``mix[0]·Σ kd_row_weight·KD + mix[1]·Σ CE`` with respect to it.

    ``kd_row_weight``: per-row float weights of the KD term; ``mix``: a float32 tensor of 2 on the
    device (no host sync); ``labels``: −100 where not supervised. KD is at ``temperature``, CE at 1.
    """
    rows, vocab = student_logits.shape
    if student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError("kd_ce_chunk needs row-major logits (stride 1 along the vocabulary)")
    div = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    nll = torch.zeros_like(div) if labels is not None else div
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    _kd_ce_rows[(rows,)](
        student_logits, teacher_logits, labels if labels is not None else div, kd_row_weight, mix, div, nll,
        vocab, student_logits.stride(0), teacher_logits.stride(0), 1.0 / temperature,
        REVERSE=reverse, HAS_LABELS=labels is not None, UNIT_T=temperature == 1.0,
        CE_LSE=labels is not None and temperature != 1.0, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return div, (nll if labels is not None else None)
