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
