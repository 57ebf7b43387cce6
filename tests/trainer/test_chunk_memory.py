"""Issue 27.3: the fused loss sizes its chunk from a memory budget, and where its memory goes is
counted from the allocator's own events (CPU: torch's profiler; GPU: benchmarks/gpu.py's
memory history)."""

import copy

import pytest
import torch

from hf_sdft import SDFTConfig
from hf_sdft.trainer import fused
from hf_sdft.trainer.fused import chunk_row_bytes, default_chunk_memory, fused_chunk_size, fused_linear_kd_ce_loss
from tests.helpers import allocation_trace, cpu_args, make_model, perturb
from tests.trainer.test_trainer import sdft_trainer

N, H, V = 2048, 256, 3000  # the unbudgeted chunk: N·H/V = 175 rows


def inputs(dtype=torch.float32, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    ht, wt = torch.randn(n, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(V, (n,), generator=g)
    return hs, ws, ht, wt, labels


def loss_peak(tensors, budget, **kw) -> int:
    hs, ws, ht, wt, labels = tensors

    def step():
        loss, _, _ = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, chunk_memory=budget, **kw)
        loss.backward()
        hs.grad = ws.grad = None

    return allocation_trace(step)[0]


CASES = [dict(loss_type="forward_kl"), dict(loss_type="forward_kl", temperature=2.0), dict(loss_type="reverse_kl"),
         dict(loss_type="jsd", beta=0.5), dict(loss_type="jsd", beta=0.5, temperature=2.0),
         dict(loss_type="cakld", beta=0.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_the_chunk_holds_at_most_its_budget(case, dtype):
    """The allocator's peak grows by at most the budget when the budget grows by it (the chunk's
    buffers, counted per row by chunk_row_bytes, are not undercounted), and by most of it (nor
    grossly overcounted); below the budget sit only the gradient buffers the size of the inputs
    (and, after the chunks, the backward's copies of them in a half-precision input's dtype)."""
    tensors = inputs(dtype)
    row = chunk_row_bytes(V, dtype, False, **case)
    small, large = 24 * row, 96 * row  # 24 and 96 rows: both below the unbudgeted 175
    assert fused_chunk_size(N, V, H, row_bytes=row, budget=small) == 24
    assert fused_chunk_size(N, V, H, row_bytes=row, budget=large) == 96
    grads = (V * H + N * H) * 4  # the float32 head and hidden-state gradient buffers
    copies = 0 if dtype == torch.float32 else (V * H + N * H) * 2  # the backward's, in the inputs' dtype
    peak_small, peak_large = loss_peak(tensors, small, **case), loss_peak(tensors, large, **case)
    assert peak_small <= grads + max(small, copies) + 256 * 1024, (peak_small, grads, small)  # + small vectors
    assert 0.8 * (large - small) <= peak_large - peak_small <= large - small, (peak_large - peak_small, large - small)


def test_the_budget_shrinks_the_chunk_and_keeps_the_loss():
    tensors = inputs()
    hs, ws, ht, wt, labels = tensors
    results = []
    for budget in (None, 10 * chunk_row_bytes(V, torch.float32, False)):  # 10 rows a chunk: 205 chunks
        loss, kd, ce = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, chunk_memory=budget)
        loss.backward()
        results.append((loss.detach(), hs.grad.clone(), ws.grad.clone()))
        hs.grad = ws.grad = None
    for unbudgeted, budgeted in zip(*results):
        torch.testing.assert_close(budgeted, unbudgeted, rtol=1e-5, atol=1e-7)
    # a budget below the smallest useful chunk still gets it, and no chunk is larger than the input
    assert fused_chunk_size(N, V, H, row_bytes=10**9, budget=1) == 8
    assert fused_chunk_size(5, V, H) == 5
    assert default_chunk_memory(torch.device("cpu")) is None  # no cap on the host


def test_triton_chunk_rows_count_two_half_precision_logit_rows():
    assert chunk_row_bytes(V, torch.bfloat16, True) - chunk_row_bytes(V // 2, torch.bfloat16, True) == 2 * 2 * V // 2
    assert chunk_row_bytes(V, torch.float32, True) - chunk_row_bytes(V // 2, torch.float32, True) == 2 * 4 * V // 2
    row = chunk_row_bytes(151_936, torch.bfloat16, True)
    # the fastest Triton chunk (hidden / 2 rows) under a budget of its own size, then a quarter of it
    assert fused_chunk_size(16_384, 151_936, 1024, True, row_bytes=row, budget=512 * row) == 512
    assert fused_chunk_size(16_384, 151_936, 1024, True, row_bytes=row, budget=128 * row) == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_where_the_head_gradient_memory_goes(dtype):
    """The allocation count behind the fused loss's (V, H) memory: one float32 accumulator for the
    head's gradient, and, for a half-precision head, one copy in its dtype made by the backward
    (V·H·2 bytes: 0.29 GiB at Qwen3's 151,936 × 1,024, the size of the gap to Liger measured on the
    H200, which accumulates in the weight's dtype)."""
    tensors = inputs(dtype)
    hs, ws, ht, wt, labels = tensors

    def step():
        loss, _, _ = fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, chunk_size=50)  # 50 · V · 4 ≠ V · H · 2
        loss.backward()

    _, sizes = allocation_trace(step)
    hs.grad = ws.grad = None
    head = V * H
    assert sizes.count(head * 4) == 1, sizes
    assert sizes.count(head * 2) == (1 if dtype == torch.bfloat16 else 0), sizes


def two_micro_batches(in_place: bool, hook: bool = False):
    """The head's gradient after two micro-batches with a bfloat16 head (as under gradient
    accumulation), and the allocations of the second one's forward + backward."""
    hs, ws, ht, wt, labels = inputs(torch.bfloat16, n=512)
    fired = []
    if hook:
        ws.register_post_accumulate_grad_hook(lambda p: fired.append(1))

    def micro_batch(seed):
        g = torch.Generator().manual_seed(seed)
        h = (hs.detach().float() + 0.1 * torch.randn(hs.shape, generator=g)).to(hs.dtype).requires_grad_()
        loss, _, _ = fused_linear_kd_ce_loss(h, ws, ht, wt, labels=labels, kd_ratio=0.5, chunk_size=50,
                                             head_grad_in_place=in_place)
        (0.5 * loss).backward()  # the 1 / accumulation steps the Trainer scales by

    micro_batch(1)
    _, sizes = allocation_trace(lambda: micro_batch(2))
    return ws.grad.float(), sizes, fired


def test_the_head_gradient_is_added_into_grad_in_place():
    """Issue 27.3: with a .grad already there, the backward adds its float32 head gradient into it
    (no (V, H) copy in the head's bfloat16), and the sum is the same up to one bfloat16 rounding
    fewer; a head with an accumulation hook is left to autograd, and the hook runs."""
    head = V * H
    default, sizes_default, _ = two_micro_batches(False)
    in_place, sizes_in_place, _ = two_micro_batches(True)
    assert sizes_default.count(head * 2) == 1 and sizes_in_place.count(head * 2) == 0
    assert sizes_in_place.count(head * 4) == 1  # the float32 accumulator: the only (V, H) buffer left
    torch.testing.assert_close(in_place, default, rtol=2**-7, atol=1e-6)  # bfloat16 has 8 significant bits
    hooked, sizes_hooked, fired = two_micro_batches(True, hook=True)
    assert fired == [1, 1] and sizes_hooked.count(head * 2) == 1
    torch.testing.assert_close(hooked, default, rtol=0, atol=0)


def test_the_trainer_budgets_the_chunk_and_adds_a_bf16_head_gradient_in_place(tmp_path, tokenizer, texts,
                                                                              monkeypatch):
    """Through SDFTTrainer: ``kd_chunk_memory_mb`` reaches the chunk size, and a bfloat16 student
    under gradient accumulation trains to the same weights with its head gradient added in place
    (one process: the trainer's default) as with autograd's copy."""
    budgets = []
    original = fused.fused_chunk_size
    monkeypatch.setattr(fused, "fused_chunk_size", lambda *a, **k: budgets.append(k["budget"]) or original(*a, **k))
    states = {}
    for in_place in (True, False):
        teacher = make_model(seed=0)
        student = perturb(copy.deepcopy(teacher)).to(torch.bfloat16)
        trainer = sdft_trainer(tmp_path / str(in_place), student, teacher, tokenizer, texts, max_steps=2,
                               learning_rate=1e-2, gradient_accumulation_steps=2, kd_chunk_memory_mb=0.05)
        assert trainer.head_grad_in_place and trainer.fused_heads is not None
        trainer.head_grad_in_place = in_place
        trainer.train()
        states[in_place] = {k: v.float() for k, v in student.state_dict().items()}
    assert set(budgets) == {int(0.05 * 2**20)}
    for name, weight in states[True].items():
        torch.testing.assert_close(weight, states[False][name], rtol=2**-6, atol=2**-6, msg=name)
    with pytest.raises(ValueError, match="kd_chunk_memory_mb"):
        SDFTConfig(output_dir=str(tmp_path), kd_chunk_memory_mb=0, **cpu_args())
