"""Run by tests/trainer/test_fused_loss.py: the fused loss with the Triton chunk kernel against the PyTorch
chunk, on CUDA (``python tests/trainer/kernel_check.py cuda``) or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1 python tests/trainer/kernel_check.py cpu``); prints one JSON list of cases."""

import itertools
import json
import sys

import torch

from hf_sdft.trainer import kd_triton
from hf_sdft.trainer.fused import fused_linear_kd_ce_loss

device = torch.device(sys.argv[1])
assert kd_triton.available(device), f"the kernel cannot run on {device} (no triton, or no TRITON_INTERPRET=1 on CPU)"
cases = []
for dtype, kind, temp, with_labels in itertools.product((torch.float32, torch.bfloat16), ("forward_kl", "reverse_kl"),
                                                       (1.0, 2.0), (True, False)):
    g = torch.Generator().manual_seed(len(cases))
    n, hidden, vocab = 37, 16, 300  # 3 chunks of 16 (the last partial); V not a power of two
    hs, ht = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)
    ws, wt = torch.randn(vocab, hidden, generator=g) * 0.4, torch.randn(vocab, hidden, generator=g) * 0.4
    bias = torch.randn(vocab, generator=g) * 0.1
    labels = torch.randint(vocab, (n,), generator=g)
    hs, ht, ws, wt, bias, labels = (t.to(device) for t in (hs, ht, ws, wt, bias, labels))
    labels[::4] = -100
    mask = labels != -100
    mask[4] = True  # KD on a row without a label
    mask[5] = False  # a labelled row without KD
    out = {}
    for kernel in ("torch", "triton"):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (hs, ws, bias)]
        loss, kd, ce = fused_linear_kd_ce_loss(
            leaves[0], leaves[1], ht.to(dtype), wt.to(dtype), mask, labels if with_labels else None, kd_ratio=0.7,
            loss_type=kind, temperature=temp, chunk_size=16, student_head_bias=leaves[2], teacher_head_bias=None,
            kernel=kernel)
        loss.backward()
        out[kernel] = {"loss": loss, "kd": kd, **({"ce": ce} if with_labels else {}),
                       **{f"grad_{i}": leaf.grad for i, leaf in enumerate(leaves)}}
    rel = {k: float((out["torch"][k].float() - out["triton"][k].float()).abs().max()
                    / out["torch"][k].float().abs().max().clamp(min=1e-12)) for k in out["torch"]}
    cases.append({"dtype": str(dtype).split(".")[-1], "kind": kind, "temperature": temp, "labels": with_labels,
                  "rel_diff": rel, "kernel_used": True})
try:
    fused_linear_kd_ce_loss(hs, ws, ht, wt, labels=labels, kd_ratio=0.5, loss_type="jsd", kernel="triton")
    refused = False
except ValueError as e:
    refused = "JSD" in str(e)
cases[0]["refused_jsd"] = refused
print(json.dumps(cases))
