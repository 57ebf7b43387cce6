"""What the benchmark scripts share: their command-line shape and the command each result row records."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def command(argv: list[str], subcommand: str = "recover") -> str:
    """The ``hf-sdft`` command line of ``argv``, with paths relative to the repository."""
    return f"hf-sdft {subcommand} " + shlex.join(str(a).replace(str(ROOT) + "/", "") for a in argv)


def parse_and_load(doc: str, saved: Path, out: str, extra=(), **lists) -> tuple[argparse.Namespace, dict]:
    """Parse ``--NAME ...`` lists (defaults from ``lists``), ``--out``, ``--update``, ``--report_only``
    and any ``extra`` ``(flag, kwargs)``; returns the arguments and the results kept from ``saved``
    (with ``--update`` or ``--report_only``; else empty)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in lists.items():
        p.add_argument(f"--{name}", nargs="*", default=list(default))
    p.add_argument("--out", default=out)
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    p.add_argument("--update", action="store_true", help=f"keep the other results from {saved.name}")
    p.add_argument("--report_only", action="store_true", help=f"rewrite the report from {saved.name}, run nothing")
    a = p.parse_args()
    return a, json.loads(saved.read_text()) if (a.update or a.report_only) and saved.exists() else {}


def bare_loss(student, teacher, ids, kd: bool):
    """The hand-written baseline's loss on a batch of token ids: forward KL(teacher ‖ student) on
    full logits, or CE (the bare loops of speed.py and gpu.py)."""
    import torch
    import torch.nn.functional as F

    logits = student(input_ids=ids).logits[:, :-1]
    if not kd:
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
    s = F.log_softmax(logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()
