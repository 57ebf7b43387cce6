"""On-policy batches: the student samples continuations of its prompts and the teacher grades
every sampled token (GKD-style; with ``teacher_context: demonstration`` the teacher also sees the
reference answer, as in Shenfeld et al.'s self-distillation).

A batch from the data becomes, per row, ``prompt + sample``. Prompts are left-padded to one width,
so the sampled tokens sit at the same positions in the student's sequence and in the teacher's
(whose prompt may be longer: the demonstration) and the KD loss compares the two position by
position; ``position_ids`` count from each row's first real token.
"""

from __future__ import annotations

import random
import time

import torch
from torch import nn

from hf_sdft.data import RAGGED_FILL, TEACHER_PROMPT
from hf_sdft.modeling import evaluating, unwrap


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> list[int]:
    """Per row of a right-padded batch, how many leading tokens form its prompt: those before the first
    supervised label (chat / prompt-completion data), or, in a row supervised from its first token
    (plain text), the first ``prompt_length`` tokens, leaving at least one token out."""
    out = []
    for row_labels, row_mask in zip(labels.tolist(), attention_mask.tolist(), strict=True):
        length = sum(row_mask)
        first = next((i for i, y in enumerate(row_labels[:length]) if y != -100), length)
        out.append(first if first > 0 else max(1, min(prompt_length, length - 1)))
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its EOS id where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(rows: list[list[int]], width: int, pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(len(rows), width)``, each row padded on ``side``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting from each row's first attended token (0 before it)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
           top_k: int, pad_token_id: int, eos_token_id: int | list[int] | None) -> list[list[int]]:
    """The model's sampled continuation of each prompt (``model.generate`` with its KV cache), cut
    after the first EOS (kept)."""
    model = unwrap(model)
    device = next(model.parameters()).device
    ids, mask = padded(prompts, max(map(len, prompts)), pad_token_id)
    with evaluating(model):
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=temperature,
            top_p=top_p, top_k=top_k or None, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id, use_cache=True,
        )[:, ids.shape[1]:].tolist()
    return cut_after_eos(out, eos_token_id)


def stop_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """A tokenizer's ``eos_token_id`` (one id, several, or none) as a list."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())


def cut_after_eos(rows: list[list[int]], eos_token_id: int | list[int] | None) -> list[list[int]]:
    """Each row up to and including its first EOS."""
    stops = set(stop_ids(eos_token_id))
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def on_policy_batch(student_prompts: list[list[int]], teacher_prompts: list[list[int]], samples: list[list[int]],
                    pad_id: int) -> dict[str, torch.Tensor]:
    """The training batch of prompts + samples: ``input_ids``, ``attention_mask``, ``position_ids``,
    ``labels`` (the sampled tokens; −100 elsewhere) and the teacher's ``teacher_input_ids``,
    ``teacher_attention_mask``, ``teacher_position_ids``, all ``(B, W + G)``. Every prompt is
    left-padded to ``W`` (the longest student or teacher prompt) and every sample right-padded to
    ``G``, so the sampled tokens occupy positions ``W … W + len − 1`` on both sides."""
    width = max(max(map(len, student_prompts)), max(map(len, teacher_prompts)))
    gen = max(1, max(map(len, samples)))
    batch = {}
    for prefix, prompts in (("", student_prompts), ("teacher_", teacher_prompts)):
        ids, mask = padded(prompts, width, pad_id)
        tail_ids, tail_mask = padded(samples, gen, pad_id, side="right")
        batch[f"{prefix}input_ids"] = torch.cat([ids, tail_ids], 1)
        batch[f"{prefix}attention_mask"] = torch.cat([mask, tail_mask], 1)
        batch[f"{prefix}position_ids"] = positions(batch[f"{prefix}attention_mask"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, width:] = batch["input_ids"][:, width:].masked_fill(batch["attention_mask"][:, width:] == 0, -100)
    batch["labels"] = labels
    return batch


class OnPolicySampler:
    """Decides which micro-batches are on-policy (a fraction ``args.on_policy_ratio``, drawn from a
    generator of its own seeded with ``args.seed``: the same draws on every process, and the data
    order and torch's random state untouched) and builds them from the data's batches. Samples come
    from ``model.generate``, or from ``vllm`` (:func:`hf_sdft.trainer.vllm_sampling.vllm_generation`), whose
    weights are synced from the student at the first sample of each optimizer step."""

    def __init__(self, args, tokenizer, vllm=None):
        self.args = args
        self.rng = random.Random(args.seed)
        self.pad_id = pad_token_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.vllm, self.synced_step = vllm, None

    def draw(self) -> bool:
        ratio = self.args.on_policy_ratio
        return ratio >= 1.0 or (ratio > 0.0 and self.rng.random() < ratio)

    def samples(self, model: nn.Module, prompts: list[list[int]], step: int) -> list[list[int]]:
        """The student's sampled continuation of each prompt, each cut after its first EOS."""
        args = self.args
        if self.vllm is None:
            return sample(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.generation_temperature,
                          top_p=args.generation_top_p, top_k=args.generation_top_k, pad_token_id=self.pad_id,
                          eos_token_id=self.eos_id)
        if step != self.synced_step:
            self.vllm.sync_weights()
            self.synced_step = step
        _, completions, _, _ = self.vllm.generate(prompts=prompts, images=None, num_generations=1)
        return cut_after_eos([list(c) for c in completions], self.eos_id)

    def batch(self, model: nn.Module, inputs: dict, step: int = 0) -> tuple[dict, dict[str, float]]:
        """The on-policy batch made from ``inputs`` (a collated batch from the data, at optimizer
        step ``step``) and its figures (``gen_tokens`` sampled, ``gen_seconds``, vLLM's weight sync
        included)."""
        args = self.args
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
        lengths = prompt_lengths(inputs["labels"].cpu(), mask, args.prompt_length)
        prompts = [row[:n] for row, n in zip(ids.tolist(), lengths, strict=True)]
        if args.teacher_context == "demonstration":
            if TEACHER_PROMPT not in inputs:
                raise ValueError(
                    "teacher_context='demonstration' needs the teacher's prompt per example (a "
                    f"'{TEACHER_PROMPT}' column): use chat or prompt/completion data, prepared by the recovery job "
                    "or by hf_sdft.data.tokenize_examples(..., teacher_template=...)"
                )
            teacher_prompts = [[t for t in row if t != RAGGED_FILL] for row in inputs[TEACHER_PROMPT].tolist()]
        else:
            teacher_prompts = prompts
        started = time.perf_counter()
        samples = self.samples(model, prompts, step)
        seconds = time.perf_counter() - started
        device = inputs["input_ids"].device
        batch = {k: v.to(device) for k, v in on_policy_batch(prompts, teacher_prompts, samples, self.pad_id).items()}
        return batch, {"gen_tokens": float(sum(map(len, samples))), "gen_seconds": seconds}
