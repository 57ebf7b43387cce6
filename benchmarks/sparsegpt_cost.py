"""Seconds per layer of SparseGPT (:func:`hf_sdft.compress.prune.sparsegpt_layer`, float32) for
square layers, 50% unstructured and 2:4, on the current device; the Hessian's accumulation over
calibration tokens (``tokens·in²``) and the forward passes are not included.

    python benchmarks/sparsegpt_cost.py [--sizes 1024 4096] [--device cpu]
"""

import argparse
import time

import torch

from hf_sdft.compress.prune import sparsegpt_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    for size in args.sizes:
        x = torch.randn(2 * size, size // 4, device=args.device) @ torch.randn(size // 4, size, device=args.device)
        x += 0.3 * torch.randn_like(x)
        h = 2 * x.T @ x / len(x)
        w = torch.randn(size, size, device=args.device)
        for pattern, nm in (("unstructured", None), ("2:4", (2, 4))):
            best = float("inf")
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                sparsegpt_layer(w, h, 0.5, nm)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            print(f"{size}x{size} {pattern}: {best:.2f} s  (threads {torch.get_num_threads()}, {args.device})")


if __name__ == "__main__":
    main()
