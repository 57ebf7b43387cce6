"""Peak RSS of ``hf-sdft recover`` against the size of a plain-text training corpus (issue 26 item 8).

Generates two ``.txt`` corpora of about 1M and 20M tokens of the embedded default model (words of
its own training text, one line each, so the file is one document as ``txt_sample_by document``
reads it), runs ``hf-sdft recover --max_steps 20`` on each in a subprocess and reads the child's
peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, one fresh Python process per run).

    python benchmarks/memory.py [--tokens 1000000 20000000] [--python /path/to/other/python --label old]

``--python`` runs another checkout's interpreter (e.g. the code before this change) on the same
corpora; results are appended to ``benchmarks/results/memory.json`` and written as ``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS


def make_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """A ``.txt`` of about ``tokens`` embedded-model tokens; returns the exact count (EOS included)."""
    from transformers import AutoTokenizer

    from hf_sdft.data import default_data_file, default_model_path, load_texts

    tok = AutoTokenizer.from_pretrained(default_model_path())
    words = " ".join(load_texts(data_file=default_data_file("train"))).split()
    rng = random.Random(seed)
    sample = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
    per_char = len(tok(sample)["input_ids"]) / len(sample)
    chars = int(tokens / per_char)
    with path.open("w") as f:
        written = 0
        while written < chars:
            line = " ".join(rng.choice(words) for _ in range(12)) + "\n"
            f.write(line)
            written += len(line)
    return round(path.stat().st_size * per_char)


def run(python: str, corpus: Path, out: Path, steps: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.time()
    cmd = [python, "-m", "hf_sdft.cli", "recover", "--train_file", str(corpus), "--max_steps", str(steps),
           "--output_dir", str(out), "--disable_tqdm", "true", "--save_steps", str(steps), "--use_cpu", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)  # not this checkout's folder
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if peak <= before:
        raise RuntimeError("RUSAGE_CHILDREN did not grow: run each size in its own benchmark process")
    return {"peak_rss_mb": round(peak / 1024, 1), "seconds": round(time.time() - started, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 20_000_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--label", default="new")
    parser.add_argument("--work", default=None, help="folder for the corpora (kept between runs)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, one process
    parser.add_argument("--table-only", action="store_true", help="rewrite memory.md from memory.json")
    a = parser.parse_args()
    if a.table_only:
        write_table(json.loads((RESULTS / "memory.json").read_text()))
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="hf-sdft-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.one is not None:  # ru_maxrss of children is a maximum over all of them: one size per process
        corpus = work / f"corpus-{a.one}.txt"
        if not corpus.exists():
            make_corpus(corpus, a.one)
        result = run(a.python, corpus, work / f"out-{a.label}-{a.one}", a.steps)
        print(json.dumps(result | {"corpus_mb": round(corpus.stat().st_size / 2**20, 1)}))
        return
    rows = []
    for tokens in a.tokens:
        proc = subprocess.run([sys.executable, __file__, "--one", str(tokens), "--work", str(work), "--python",
                               a.python, "--label", a.label, "--steps", str(a.steps)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        rows.append({"label": a.label, "tokens": tokens, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / "memory.json"
    previous = [r for r in (json.loads(saved.read_text()) if saved.exists() else []) if r["label"] != a.label]
    saved.write_text(json.dumps(previous + rows, indent=2))
    write_table(previous + rows)


def write_table(rows: list[dict]) -> None:
    """``memory.md``: peak RSS per corpus size, one column per label (e.g. ``new`` against ``old``)."""
    labels = sorted({r["label"] for r in rows})
    sizes = sorted({r["tokens"] for r in rows})
    by = {(r["label"], r["tokens"]): r for r in rows}
    lines = ["# Peak RSS of `hf-sdft recover --max_steps 20` against the training corpus", "",
             "Embedded default model, plain-text corpus, one process per run, 2 CPU cores "
             "(`python benchmarks/memory.py`). Seconds are the whole job's wall time on cores shared with other "
             "work: not a speed comparison.", "",
             "| training tokens | corpus MB | " + " | ".join(f"{lb}: peak RSS MB | {lb}: seconds" for lb in labels) + " |",
             "|---|---|" + "---|---|" * len(labels)]
    for n in sizes:
        cells = []
        for lb in labels:
            r = by.get((lb, n))
            cells += [str(r["peak_rss_mb"]), str(r["seconds"])] if r else ["not measured", "not measured"]
        corpus = next(r["corpus_mb"] for r in rows if r["tokens"] == n)
        lines.append(f"| {n:,} | {corpus} | " + " | ".join(cells) + " |")
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
