"""Loader for the local lm-evaluation-harness tasks of this folder (``custom_dataset`` in
their YAML): reads a ``.jsonl`` shipped next to this file, so the tasks need no Hub access
and work from any working directory, editable install or not."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict


def load_jsonl(jsonl_file: str, **_) -> DatasetDict:  # lm-eval also passes the task's metadata
    path = Path(__file__).resolve().parent / jsonl_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
