"""``hf-sdft rewrite``: the original model rewrites each fine-tuning response in its own words
before fine-tuning (the self-distillation of Yang et al., ACL 2024), so that fine-tuning on the
rewrites moves the model less and it forgets less.

Rows are read from a ``.jsonl`` file in TRL's formats (``messages``, or ``prompt`` + ``completion``)
and written to the output file in the same format with the completion replaced, in order and
flushed batch by batch: a rerun skips the rows already written. A rewrite that is empty, fails
``check_regex``, or whose ``answer_regex`` answer differs from the reference's keeps the reference
(``"reference_kept": true`` in its row).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_sdft.data import _chat_ids, jsonl_rows, message_text, split_prompt
from hf_sdft.trainer.on_policy import pad_token_id, padded

DEFAULT_TEMPLATE = (
    "Here is an instruction and a reference answer to it. Answer the instruction in your own words, "
    "following the reference answer.\n\nInstruction: {instruction}\n\nReference answer: {reference}\n\nYour answer:"
)
KEPT = "reference_kept"


@dataclass
class RewriteArguments:
    """``hf-sdft rewrite`` options."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "The original model (default: embedded)."})
    train_file: str | None = field(default=None, metadata={"help": "Fine-tuning data (.jsonl, TRL chat formats)."})
    output_file: str | None = field(default=None, metadata={"help": "Where the rewritten rows go (.jsonl)."})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "Rewrite prompt: {instruction} and {reference}."})
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding."})
    check_regex: str | None = field(default=None, metadata={"help": "A rewrite must match this regex (re.search)."})
    answer_regex: str | None = field(
        default=None, metadata={"help": "Extracts the answer (group 1) from reference and rewrite; they must agree."}
    )

    def __post_init__(self):
        if "{instruction}" not in self.template or "{reference}" not in self.template:
            raise ValueError("template must contain {instruction} and {reference}")
        for name in ("check_regex", "answer_regex"):
            if getattr(self, name) is not None:
                try:
                    re.compile(getattr(self, name))
                except re.error as err:
                    raise ValueError(f"{name}={getattr(self, name)!r} is not a valid regex: {err}") from None
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1 and temperature >= 0")


def instruction_and_reference(row: dict) -> tuple[str, str]:
    """The instruction (a conversation's last user turn) and the reference response of a row."""
    prompt, completion = split_prompt(row)
    instruction = message_text(prompt[-1]["content"]) if isinstance(prompt, list) else str(prompt)
    return instruction, message_text(completion)


def with_completion(row: dict, text: str) -> dict:
    """``row`` with its trained response replaced by ``text``, in the row's own format."""
    prompt, completion = split_prompt(row)
    if "messages" in row and row.get("prompt") is None:
        return {**row, "messages": [*prompt, {**completion[0], "content": text}]}
    if isinstance(completion, list):
        return {**row, "completion": [{**completion[0], "content": text}]}
    return {**row, "completion": text}


def accepted(rewrite: str, reference: str, args: RewriteArguments) -> bool:
    if not rewrite.strip():
        return False
    if args.check_regex is not None and re.search(args.check_regex, rewrite) is None:
        return False
    if args.answer_regex is not None:
        ours, theirs = re.search(args.answer_regex, rewrite), re.search(args.answer_regex, reference)
        if ours is None or theirs is None or ours.group(1).strip() != theirs.group(1).strip():
            return False
    return True


def generation_prompt(tokenizer, text: str) -> list[int]:
    """``text`` as one user turn with the chat template (when the tokenizer has one), else plain."""
    if tokenizer.chat_template is not None:
        return _chat_ids(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], args: RewriteArguments) -> list[str]:
    """Batched decoding of the prompts' continuations (up to EOS), as text."""
    pad_id = pad_token_id(tokenizer)
    ids, mask = padded(prompts, max(map(len, prompts)), pad_id)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=args.max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return [text.strip() for text in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def rewrite_file(model, tokenizer, args: RewriteArguments) -> dict:
    """Rewrite ``args.train_file`` into ``args.output_file`` (resuming after the rows already there);
    returns ``{"rows", "rewritten", "kept", "skipped"}``."""
    source, target = Path(args.train_file), Path(args.output_file)
    rows = list(jsonl_rows(source))
    if not rows:
        raise ValueError(f"{source} holds no rows to rewrite")
    done = list(jsonl_rows(target)) if target.exists() else []
    if len(done) > len(rows):
        raise ValueError(f"{target} has more rows ({len(done)}) than {source} ({len(rows)}): a different file?")
    target.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    kept = sum(bool(r.get(KEPT)) for r in done)
    with target.open("a") as out, tqdm(total=len(rows), initial=len(done), desc="rewrite") as bar:
        for start in range(len(done), len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            pairs = [instruction_and_reference(r) for r in batch]
            prompts = [generation_prompt(tokenizer, args.template.format(instruction=i, reference=ref))
                       for i, ref in pairs]
            for row, (_, reference), text in zip(batch, pairs, generate(model, tokenizer, prompts, args), strict=True):
                ok = accepted(text, reference, args)
                kept += not ok
                out.write(json.dumps({**with_completion(row, text if ok else reference), KEPT: not ok}) + "\n")
            out.flush()
            bar.update(len(batch))
    return {"rows": len(rows), "rewritten": len(rows) - kept, "kept": kept, "skipped": len(done)}
