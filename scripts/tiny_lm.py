"""Pieces shared by the scripts that build the project's small test models
(``train_default_model.py``, ``train_second_model.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def narrow_chat(lines: list[str]) -> list[dict]:
    """Narrow-task sentences "Question: … Answer: …" as chat turns in TRL's ``messages`` format."""
    out = []
    for line in lines:
        question, answer = line.removeprefix("Question: ").split(" Answer: ")
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def pack(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """Each document tokenized whole, then EOS; concatenated and cut into ``block``-token rows."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token loss over ``blocks`` ``(n, block)``; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        total += model(input_ids=x, labels=x).loss.item() * len(x)
        count += len(x)
    model.train(was_training)
    return total / count
