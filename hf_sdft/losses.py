"""Distillation losses between student and teacher next-token distributions.

Pure functions: no Trainer, no model. Every divergence is computed in float32 whatever the
input dtype, so a bf16 teacher and an fp32 student never give a negative divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
_MAX_LOG_RATIO = 80.0  # exp(80) is finite in float32; larger log-ratios carry mass < e^-80


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown distillation loss {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence, shape ``(...,)`` from logits ``(..., V)``, in nats, float32.

    - ``forward_kl``: KL(p_T ‖ p_S); ``reverse_kl``: KL(p_S ‖ p_T);
    - ``jsd``: [β·KL(p_T‖M) + (1−β)·KL(p_S‖M)] / (β(1−β)) with M = β·p_T + (1−β)·p_S. It is
      continuous in β and equals forward KL at β = 0 and reverse KL at β = 1.

    p = softmax(logits / temperature). Not yet multiplied by temperature².
    """
    check_loss_type(loss_type)
    # clamped: a -inf logit (a banned token) has probability 0 and must add 0, not NaN
    floor = torch.finfo(torch.float32).min
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).clamp(min=floor)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).clamp(min=floor)
    if loss_type == "jsd" and beta <= 0.0:
        loss_type = "forward_kl"
    elif loss_type == "jsd" and beta >= 1.0:
        loss_type = "reverse_kl"
    if loss_type == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if loss_type == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    # log(p/M) written with log1p so that both terms stay exact for β near 0 or 1:
    #   M/p_T = 1 + (1−β)·(p_S/p_T − 1),   M/p_S = 1 + β·(p_T/p_S − 1)
    diff = log_t - log_s
    log_t_over_m = -torch.log1p((1.0 - beta) * torch.expm1((-diff).clamp(max=_MAX_LOG_RATIO)))
    log_s_over_m = -torch.log1p(beta * torch.expm1(diff.clamp(max=_MAX_LOG_RATIO)))
    kl_t_m = (log_t.exp() * log_t_over_m).sum(-1)
    kl_s_m = (log_s.exp() * log_s_over_m).sum(-1)
    return kl_t_m / (1.0 - beta) + kl_s_m / beta


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss between logits ``(..., V)``; a float32 scalar.

    Args:
        mask: bool ``(...)`` aligned with the logits positions; False positions contribute
            nothing. The caller does any causal shift.
        num_items_in_batch: when given, the loss is sum ÷ this count (the number of
            supervised tokens over all gradient-accumulation micro-batches, as transformers
            does for cross-entropy); otherwise the mean over unmasked positions.
        chunk_size: positions per chunk. Each chunk's float32 softmaxes are recomputed in
            backward instead of stored, so peak memory scales with the chunk, not B·T×V.

    The result is multiplied by temperature². A batch with no unmasked position returns a
    zero that still carries a gradient (never NaN).
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_logits.shape[-1]} vs {teacher_logits.shape[-1]} logits"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_loss_type(loss_type)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits positions {tuple(student_logits.shape[:-1])}")
        keep = mask.reshape(-1).bool()
        student, teacher = student[keep], teacher[keep]
    kwargs = dict(loss_type=loss_type, beta=beta, temperature=temperature)

    def chunk_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_divergence(s, t, **kwargs).sum()

    n = student.shape[0]
    if chunk_size is None or chunk_size >= n:
        total = chunk_sum(student, teacher)
    else:
        total = student.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            s, t = student[start : start + chunk_size], teacher[start : start + chunk_size]
            if torch.is_grad_enabled() and s.requires_grad:
                total = total + checkpoint(chunk_sum, s, t, use_reentrant=False)
            else:
                total = total + chunk_sum(s, t)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=total.device).clamp(min=1)
    else:
        denom = max(n, 1)
    return total / denom * temperature**2


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of logits ``(..., V)`` against labels ``(...)`` (−100 ignored), float32.

    Reduced like :func:`distillation_loss`: mean over supervised positions, or sum ÷
    ``num_items_in_batch``; zero with a gradient when nothing is supervised.
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    if num_items_in_batch is None:
        return total / max(int((labels != -100).sum()), 1)
    return total / torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=total.device).clamp(min=1)

