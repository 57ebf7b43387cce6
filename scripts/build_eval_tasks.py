"""Build a next-sentence multiple-choice task for lm-evaluation-harness from a text corpus.

The input is read by ``hf_sdft.data.load_texts``: a ``.jsonl`` with one document a row (as
``hf_sdft/default_data/eval.jsonl``, the held-out King James chapters) or a ``.txt`` split
into documents by ``--txt_sample_by`` (one a line by default). An item shows up to
``--context_sentences`` consecutive sentences of a document and asks for the sentence that
follows, among 4 options: the true one and 3 distractors, sentences of similar length taken
from *other* documents. Everything is seeded, so rebuilding gives the same files.

    python scripts/build_eval_tasks.py                       # the shipped sdft_kjv_nextline
    python scripts/build_eval_tasks.py --input my_corpus.jsonl --name mycorpus   # sdft_mycorpus_nextline

writes ``hf_sdft/eval_tasks/sdft_<name>_nextline.{jsonl,yaml}``; the new task is then
available to ``hf_sdft.jobs.downstream.evaluate_tasks`` (and to ``lm_eval --include_path
hf_sdft/eval_tasks``) by name. Use a held-out text the model never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from hf_sdft.data import load_texts

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "hf_sdft" / "eval_tasks"
SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
MIN_CHARS, MAX_CHARS, MAX_CONTEXT_CHARS = 20, 300, 700

YAML = """\
# Built by scripts/build_eval_tasks.py from {source}: do not edit by hand.
# Given a few consecutive sentences of a held-out document, pick the sentence that follows
# among 4 (the 3 distractors are sentences of similar length from other documents).
task: {task}
custom_dataset: !function utils.load_jsonl   # reads the .jsonl next to this file, offline
dataset_kwargs:
  jsonl_file: {task}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  items: {n}
  seed: {seed}
"""


def sentences(doc: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(doc) if s.strip()]


def build_items(docs: list[str], n: int, seed: int, context_sentences: int) -> list[dict]:
    rng = random.Random(seed)
    sents = [sentences(d) for d in docs]
    # (doc, index) of every sentence usable as an answer: not too short or long, after a sentence that fits the context
    slots = [
        (d, i) for d, ss in enumerate(sents) for i in range(1, len(ss))
        if MIN_CHARS <= len(ss[i]) <= MAX_CHARS and len(ss[i - 1]) <= MAX_CONTEXT_CHARS
    ]
    pool = [(d, s) for d, ss in enumerate(sents) for s in ss if MIN_CHARS <= len(s) <= MAX_CHARS]
    if len(docs) < 2 or len(slots) < n:
        raise ValueError(f"need at least 2 documents and {n} answer sentences, got {len(docs)} and {len(slots)}")
    items = []
    for d, i in rng.sample(slots, n):  # random order: a --limit prefix is a random subset
        answer = sents[d][i]
        context = sents[d][i - 1]
        for prev in reversed(sents[d][max(0, i - context_sentences) : i - 1]):  # extend backwards within the cap
            if len(prev) + 1 + len(context) > MAX_CONTEXT_CHARS:
                break
            context = f"{prev} {context}"
        # the answer's length rank among the options is uniform: no length heuristic beats chance
        n_shorter = rng.randrange(4)
        shorter = [s for od, s in pool if od != d and 0.67 <= len(s) / len(answer) < 1]
        longer = [s for od, s in pool if od != d and 1 < len(s) / len(answer) <= 1.5]
        seen = {answer.lower()}  # formulaic sentences recur across documents: never offer the answer twice
        distractors = []
        for candidates, k in [(shorter, n_shorter), (longer, 3 - n_shorter), ([s for od, s in pool if od != d], 3)]:
            for s in rng.sample(candidates, len(candidates)):
                if len(distractors) == 3 or k == 0:
                    break
                if s.lower() not in seen:
                    seen.add(s.lower())
                    distractors.append(s)
                    k -= 1
        choices = distractors + [answer]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer), "doc": d})
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(ROOT / "hf_sdft" / "default_data" / "eval.jsonl"),
                        help=".jsonl (one document a row) or .txt (see --txt_sample_by); default: the held-out KJV chapters")
    parser.add_argument("--name", default="kjv", help="task name is sdft_<name>_nextline")
    parser.add_argument("--n", type=int, default=200, help="number of items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context_sentences", type=int, default=3, help="sentences shown before the answer (at most)")
    parser.add_argument("--out_dir", default=str(TASKS_DIR))
    parser.add_argument("--txt_sample_by", default="line", help="documents of a .txt input: document | paragraph | line")
    args = parser.parse_args(argv)

    if not re.fullmatch(r"[a-z0-9_]+", args.name):
        raise SystemExit(f"--name {args.name!r}: use lowercase letters, digits and _")
    docs = [d.strip() for d in load_texts(data_file=args.input, txt_sample_by=args.txt_sample_by)]
    items = build_items(docs, args.n, args.seed, args.context_sentences)
    task = f"sdft_{args.name}_nextline"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{task}.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    try:
        source = Path(args.input).resolve().relative_to(ROOT)
    except ValueError:
        source = Path(args.input).name
    (out / f"{task}.yaml").write_text(YAML.format(source=source, task=task, n=len(items), seed=args.seed))
    print(f"wrote {len(items)} items to {out / task}.{{jsonl,yaml}}")


if __name__ == "__main__":
    main()
