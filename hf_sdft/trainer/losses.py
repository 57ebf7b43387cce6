"""Distillation losses between student and teacher next-token distributions.

Pure functions: no Trainer, no model, no autograd function (the fused heads-in-the-loss pass, with
its kernel choice, is :mod:`hf_sdft.trainer.fused`). Every divergence is computed in float32 whatever the
input dtype, so a bf16 teacher and an fp32 student never give a negative divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_sdft.modeling import check_vocabularies

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "cakld")
BLENDS = ("jsd", "cakld")  # losses with a weight β (CAKLD: γ) that is forward KL at 0 and reverse KL at 1
_MAX_LOG_RATIO = 80.0  # exp(80) is finite in float32; larger log-ratios carry mass < e^-80
_FLOOR = torch.finfo(torch.float32).min  # log-probabilities are clamped here: log 0 = -inf would give NaN


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown distillation loss {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax of ``logits / temperature`` (``logits`` untouched), clamped at the float32
    minimum: a -inf logit (a banned token) has probability 0 and must add 0, not NaN. The one
    spelling of it for every loss here and in :mod:`hf_sdft.trainer.fused`."""
    z = logits.float()
    out = F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
    # in place where no graph needs the log-softmax's output: one (n, V) buffer less
    return out.clamp(min=_FLOOR) if out.requires_grad else out.clamp_(min=_FLOOR)


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
    - ``cakld``: γ·KL(p_S‖p_T) + (1−γ)·KL(p_T‖p_S) with γ = ``beta``, the Confidence-Aware KL
      divergence of BitDistiller (Du et al., ACL 2024, arXiv 2402.10631, §3.2): γ·reverse KL +
      (1 − γ)·forward KL, where the paper sets γ to the teacher's mean probability of the
      ground-truth tokens over the training data, E_(x,y)[1/|y| Σ_i p_T(y_i | x, y_<i)], computed
      once before training (:func:`label_logprobs` and :func:`mean_label_probability` give its
      terms; the trainers estimate it, or take ``cakld_gamma``). A constant γ, not a per-token
      confidence: γ = 0 is forward KL and γ = 1 reverse KL exactly.

    p = softmax(logits / temperature). Not yet multiplied by temperature².
    """
    check_loss_type(loss_type)
    log_s, log_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return logprob_divergence(log_s, log_t, loss_type, beta)


def _effective(loss_type: str, beta: float) -> str:
    """JSD and CAKLD at β = 0 are forward KL and at β = 1 reverse KL (JSD's limits, CAKLD's ends)."""
    if loss_type in BLENDS and beta <= 0.0:
        return "forward_kl"
    if loss_type in BLENDS and beta >= 1.0:
        return "reverse_kl"
    return loss_type


def _log_ratios_to_mixture(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(p_T/M) and log(p_S/M) for M = β·p_T + (1−β)·p_S, written with log1p so that both stay
    exact for β near 0 or 1: M/p_T = 1 + (1−β)·(p_S/p_T − 1), M/p_S = 1 + β·(p_T/p_S − 1)."""
    diff = log_t - log_s
    log_t_over_m = -torch.log1p((1.0 - beta) * torch.expm1((-diff).clamp(max=_MAX_LOG_RATIO)))
    log_s_over_m = -torch.log1p(beta * torch.expm1(diff.clamp(max=_MAX_LOG_RATIO)))
    return log_t_over_m, log_s_over_m


def logprob_divergence(log_s: torch.Tensor, log_t: torch.Tensor, loss_type: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence ``(...,)`` between distributions given as float32 log-probabilities
    ``(..., K)`` over the same K outcomes (a vocabulary, or top-k tokens plus a tail bucket)."""
    loss_type = _effective(loss_type, beta)
    if loss_type == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if loss_type == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if loss_type == "cakld":
        return beta * (log_s.exp() * (log_s - log_t)).sum(-1) + (1.0 - beta) * (log_t.exp() * (log_t - log_s)).sum(-1)
    log_t_over_m, log_s_over_m = _log_ratios_to_mixture(log_s, log_t, beta)
    return (log_t.exp() * log_t_over_m).sum(-1) / (1.0 - beta) + (log_s.exp() * log_s_over_m).sum(-1) / beta


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
        loss_type, beta: the divergence, as :func:`token_divergence` defines them (``beta`` is
            JSD's β, or CAKLD's γ).
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
    check_vocabularies(student_logits.shape[-1], teacher_logits.shape[-1], "logits")
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

    total = _chunked_sum(chunk_sum, (student, teacher), chunk_size)
    return _reduce(total, student.shape[0], num_items_in_batch) * temperature**2


def _chunked_sum(fn, tensors: tuple[torch.Tensor, ...], chunk_size: int | None) -> torch.Tensor:
    """Σ fn(chunk) over row chunks of ``tensors`` (the first one differentiable); each chunk's
    intermediates are recomputed in backward instead of stored."""
    n = tensors[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(*tensors)
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        parts = tuple(t[start : start + chunk_size] for t in tensors)
        if torch.is_grad_enabled() and tensors[0].requires_grad:
            total = total + checkpoint(fn, *parts, use_reentrant=False)
        else:
            total = total + fn(*parts)
    return total


def _reduce(total: torch.Tensor, count, num_items_in_batch) -> torch.Tensor:
    """sum ÷ ``num_items_in_batch`` when given, else ÷ ``count`` (at least 1)."""
    if torch.is_tensor(num_items_in_batch):
        return total / num_items_in_batch.to(total.device, torch.float32).clamp(min=1)
    if num_items_in_batch is not None:  # a Python number: no host-to-device copy (a blocking one on CUDA)
        return total / max(float(num_items_in_batch), 1.0)
    return total / (count.clamp(min=1) if torch.is_tensor(count) else max(count, 1))


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
    return _reduce(total, (labels != -100).sum(), num_items_in_batch)


_LABEL_CHUNK = 256  # positions per chunk of label_logprobs: a chunk's float32 logits, not B·T×V of them


def label_logprobs(
    teacher_out: torch.Tensor,
    labels: torch.Tensor,
    *,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p_T(label) at ``temperature`` per position ``(...)``, float32, from the teacher's logits
    ``(..., V)``, or from the input of its linear head ``(..., H)`` when ``head_weight`` ``(V, H)``
    is given (then no more than a chunk of logits exists). Positions labelled −100 get
    −inf: they are skipped, never computed. CAKLD's γ is the mean of exp() of these
    (:func:`mean_label_probability`)."""
    flat = teacher_out.reshape(-1, teacher_out.shape[-1])
    y = labels.reshape(-1).to(flat.device)
    out = torch.full(y.shape, float("-inf"), dtype=torch.float32, device=flat.device)
    rows = (y != -100).nonzero()[:, 0]
    step = chunk_size or _LABEL_CHUNK
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        z = flat[idx] if head_weight is None else F.linear(flat[idx], head_weight, head_bias)
        out[idx] = log_probs(z, temperature).gather(1, y[idx, None])[:, 0]
    return out.reshape(labels.shape)


def cached_label_logprobs(teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """:func:`label_logprobs` from a teacher cache ``(..., k)``: a label outside the cached top-k
    gets −inf (probability 0), so the γ estimated from it is a lower bound, exact when k = V."""
    hit = teacher_topk_ids.long() == labels[..., None].long()
    found = torch.where(hit, teacher_topk_logprobs.float(), float("-inf")).amax(-1)
    return found.masked_fill(labels == -100, float("-inf"))


def mean_label_probability(label_logprob: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sums of CAKLD's γ = E_(x,y)[1/|y| Σ_i p_T(y_i | x, y_<i)] (BitDistiller's
    definition) over a batch of sequences ``(B, T)``: Σ over sequences of the mean teacher
    probability of their labelled tokens, and the number of sequences with a label (float32
    scalars). γ is the first sum ÷ the second, accumulated over the calibration batches."""
    labelled = labels != -100
    count = labelled.sum(-1)
    per_sequence = torch.where(labelled, label_logprob.float().exp(), 0.0).sum(-1) / count.clamp(min=1)
    return per_sequence.sum(), (count > 0).sum().float()


def _topk_buckets(log_s: torch.Tensor, ids: torch.Tensor, t_logprobs: torch.Tensor, t_tail: torch.Tensor):
    """Student and teacher log-probabilities ``(n, k + 1)`` over the teacher's top-k tokens plus
    one bucket for all other tokens. A teacher tail of probability 0 (k = V) is dropped."""
    ids = ids.long()
    s_k = log_s.gather(-1, ids)
    s_tail = torch.logsumexp(log_s.scatter(-1, ids, _FLOOR), -1)  # log Σ p_S over the tokens outside the top-k
    no_tail = ~(t_tail.float() > _FLOOR)
    s_tail = s_tail.masked_fill(no_tail, _FLOOR)
    t_tail = t_tail.float().masked_fill(no_tail, _FLOOR)
    return (torch.cat([s_k, s_tail[:, None]], -1),
            torch.cat([t_logprobs.float().clamp(min=_FLOOR), t_tail[:, None]], -1))


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation from cached teacher outputs (``hf-sdft cache-teacher``); a float32 scalar
    reduced as :func:`distillation_loss`.

    The divergence is taken over k + 1 outcomes: the teacher's top-k tokens ``(..., k)`` with
    their log-probabilities ``(..., k)``, and the tail bucket of every other token, whose teacher
    log-mass is ``teacher_tail_logprob`` ``(...)`` and student log-mass is computed from
    ``student_logits`` ``(..., V)`` (softmax at ``temperature``, the temperature the cache was
    written at). With k = V this is exactly the full-vocabulary loss, for every ``loss_type``
    (CAKLD included: its two KLs are taken over the same k + 1 outcomes).
    """
    check_loss_type(loss_type)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"cache shapes {tuple(teacher_topk_ids.shape)} / {tuple(teacher_topk_logprobs.shape)} do not "
                         f"match the student's logits {tuple(student_logits.shape)}")
    vocab, k = student_logits.shape[-1], teacher_topk_ids.shape[-1]
    student = student_logits.reshape(-1, vocab)
    cached = (teacher_topk_ids.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k), teacher_tail_logprob.reshape(-1))
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student, cached = student[keep], tuple(c[keep] for c in cached)

    def chunk_sum(s, ids, lp, tail):
        log_s = log_probs(s, temperature)
        return logprob_divergence(*_topk_buckets(log_s, ids, lp, tail), loss_type, beta).sum()

    total = _chunked_sum(chunk_sum, (student, *cached), chunk_size)
    return _reduce(total, student.shape[0], num_items_in_batch) * temperature**2
