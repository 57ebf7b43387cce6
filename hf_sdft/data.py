"""All data preparation for recovery, in one place.

- Reading: Hub ids or local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files.
  A ``.txt`` file keeps its text: read whole as one document (``txt_sample_by="document"``),
  or split into documents at blank lines (``"paragraph"``) or at line ends (``"line"``).
- Plain text (a ``text`` column): each document tokenized whole, as the model was trained
  (the tokenizer's own special tokens, then EOS at the document's end only), packed into
  fixed-length blocks (:func:`pack_blocks`).
- Chat and instruction data in TRL's formats (``messages``, ``prompt``/``completion``,
  conversational or not): rendered with the model's chat template, labels on the completion
  only (:func:`tokenize_examples`), the way TRL's ``SFTTrainer`` tokenizes them.
- Held-out perplexity batches and the fixed CKA probe set (:func:`held_out`; the recovery job
  assembles its data in :func:`hf_sdft.jobs.recovery_data.load_recovery_data`).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

TXT_SAMPLE_BY = ("document", "paragraph", "line")
TEACHER_PROMPT = "teacher_prompt_ids"  # column: the demonstration teacher's prompt tokens (on-policy batches)
RAGGED_FILL = -100  # fill of a collated TEACHER_PROMPT column (its rows have their own lengths)
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EXTENSIONS = (".txt", *TABLE_BUILDERS)
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
DEFAULT_SPLITS = {  # shipped with the embedded default model: (train, eval, narrow train, narrow eval)
    "text": ("train", "eval", "narrow_train", "narrow_eval"),
    "chat": ("chat_train", "chat_eval", "narrow_chat_train", "narrow_chat_eval"),
}


def default_model_path() -> str:
    """The small pretrained causal LM shipped inside the package."""
    return str(resources.files("hf_sdft") / "default_model")


def default_data_file(name: str) -> str:
    """A split shipped with the default model (``.jsonl``, one document or chat example a row):
    train, eval, narrow_train, narrow_eval, chat_train, chat_eval, narrow_chat_train, narrow_chat_eval."""
    path = resources.files("hf_sdft") / "default_data" / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"no shipped data split {name!r}: choose one of {', '.join(sum(DEFAULT_SPLITS.values(), ()))}")
    return str(path)


def not_utf8(path, err: UnicodeDecodeError, offset: int) -> ValueError:
    """The error for a file that is not UTF-8: the file, the byte's offset and value, the fix."""
    return ValueError(f"{path} is not UTF-8 text: the byte at offset {offset} (0x{err.object[err.start]:02x}) "
                      f"cannot be decoded ({err.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8")


def read_txt(path: str | Path, sample_by: str = "document") -> list[str]:
    """Documents of a ``.txt`` file, line breaks kept: the whole file, its blank-line-separated
    paragraphs (leading/trailing newlines of each stripped), or its lines."""
    if sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"txt_sample_by={sample_by!r}: choose one of {', '.join(TXT_SAMPLE_BY)}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err, err.start) from None
    if sample_by == "document":
        docs = [text]
    elif sample_by == "paragraph":
        docs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    else:
        docs = text.splitlines()
    return [d for d in docs if d.strip()]


def jsonl_row(path: Path, number: int, line: bytes) -> dict:
    """One line of a JSON Lines file as a row (a JSON object); raises naming the file and line."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path} line {number} {what}: fix or remove that line")

    try:
        row = json.loads(line.rstrip())  # the line end is not part of the row (nor of an unterminated string)
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise bad(f"is not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise bad(f"holds {JSON_KINDS.get(type(row), type(row).__name__)}, not a JSON object {{...}} (one row a line)")
    return row


def jsonl_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a JSON Lines file, one JSON object a line; blank lines are skipped (as
    ``datasets`` skips them). A bad line raises a ``ValueError`` naming the file and the line (1-based)."""
    path = Path(path)
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield jsonl_row(path, number, line)


def check_jsonl(path: str | Path) -> None:
    """Raise naming the file and line when a line of ``path`` is not a JSON object, or when the file
    holds no row (``datasets``' own error names neither)."""
    if sum(1 for _ in jsonl_rows(path)) == 0:
        raise ValueError(f"data file {path} is empty: give a file that holds rows, one JSON object a line")


def load_jsonl(path: Path) -> Dataset:
    """A JSON Lines file read by ``datasets``; only when that fails, or finds no row, is the file
    scanned again (:func:`check_jsonl`) for the error to give, so a good file is read once."""
    try:
        ds = load_dataset("json", data_files={"data": str(path)}, split="data")
    except Exception:
        check_jsonl(path)  # names the bad line; a failure it cannot explain goes up as it was
        raise
    if len(ds) == 0:
        check_jsonl(path)
    return ds


def load_examples(
    *, dataset_name: str | None = None, dataset_config_name: str | None = None, data_file: str | None = None,
    split: str = "train", txt_sample_by: str = "document",
) -> Dataset:
    """Raw examples from a Hub dataset (``dataset_name``, ``split``) or a local file."""
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise FileNotFoundError(f"data file {data_file} does not exist")
        if path.suffix not in EXTENSIONS:
            raise ValueError(f"{data_file}: unsupported extension, use one of {', '.join(EXTENSIONS)}")
        if path.stat().st_size == 0 or (path.suffix == ".txt" and not read_txt(path, "document")):
            raise ValueError(f"data file {data_file} is empty: give a file that holds text")
        if path.suffix == ".txt":
            return Dataset.from_dict({"text": read_txt(path, txt_sample_by)})
        if path.suffix == ".jsonl":
            return load_jsonl(path)
        return load_dataset(TABLE_BUILDERS[path.suffix], data_files={"data": str(path)}, split="data")
    if dataset_name is not None:
        return load_dataset(dataset_name, dataset_config_name, split=split)
    raise ValueError("no dataset: set dataset_name or a data file")


def column_names(ds) -> list[str]:
    """A dataset's columns; a stream that does not know them yet is asked for its first row."""
    return getattr(ds, "column_names", None) or list(next(iter(ds)).keys())


def data_format(ds: Dataset, text_field: str = "text") -> str:
    """``"chat"`` (``messages``, or ``prompt`` + ``completion``) or ``"text"`` (``text_field``)."""
    columns = column_names(ds)
    if "messages" in columns or {"prompt", "completion"} <= set(columns):
        return "chat"
    if text_field in columns:
        return "text"
    raise ValueError(
        f"dataset has no text field {text_field!r} (columns: {', '.join(columns)}): set dataset_text_field, "
        "or give chat data with a 'messages' column or 'prompt' and 'completion' columns"
    )


def load_texts(*, text_field: str = "text", **source) -> list[str]:
    """The non-empty texts of a plain-text dataset (see :func:`load_examples` for ``source``)."""
    ds = load_examples(**source)
    if data_format(ds, text_field) != "text":
        raise ValueError(f"expected plain text in column {text_field!r}, got chat data (columns: {ds.column_names})")
    return texts_of(ds, text_field)


def texts_of(ds: Dataset, text_field: str) -> list[str]:
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"dataset field {text_field!r} holds no text")
    return texts


def document_ids(tokenizer, text: str) -> list[int]:
    """One document's tokens as in pretraining: the tokenizer's special tokens (e.g. BOS), the
    text tokenized whole, then EOS unless the tokenizer already ended it with EOS."""
    ids = tokenizer(text)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def pack_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None) -> Dataset:
    """Concatenate the documents' tokens (:func:`document_ids`) and cut them into
    ``block_size``-token blocks. Returns ``input_ids``, ``attention_mask`` and ``labels`` (= input_ids)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(document_ids(tokenizer, t))
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the text holds {len(ids)} tokens: not enough for one block of {block_size}")
    blocks = torch.tensor(ids[: n * block_size]).view(n, block_size).tolist()
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n, "labels": blocks})


def split_prompt(example: dict) -> tuple:
    """(prompt, completion) of a chat example: ``prompt``/``completion`` as given, or a
    ``messages`` conversation cut before its last assistant turn (the turn that is trained on)."""
    if "messages" not in example or example.get("prompt") is not None:
        return example["prompt"], example["completion"]
    messages = example["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"a conversation has no assistant turn to train on: {messages!r}")
    return messages[:last], messages[last:last + 1]


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if tokenizer.chat_template is None:
        raise ValueError(
            "the data is conversational but the tokenizer has no chat template: use a model with one, set "
            "tokenizer.chat_template, or give prompt/completion as plain strings"
        )
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def example_ids(tokenizer, example: dict) -> tuple[list[int], int]:
    """(prompt + completion tokens, number of prompt tokens) of one chat example, as TRL's
    ``SFTTrainer`` builds them: the completion starts where the tokenized prompt and
    prompt + completion stop agreeing; plain-string completions end with EOS."""
    prompt, completion = split_prompt(example)
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
        full = _chat_ids(tokenizer, prompt + completion, generation_prompt=False)
    else:
        prompt_ids, full = tokenizer(prompt)["input_ids"], document_ids(tokenizer, prompt + completion)
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    return full, n


def message_text(content) -> str:
    """A message list's text contents joined by line breaks, or the string itself."""
    if isinstance(content, list):
        return "\n".join(str(m.get("content", "")) for m in content if m.get("content"))
    return str(content)


def teacher_prompt_ids(tokenizer, example: dict, template: str) -> list[int]:
    """The demonstration teacher's prompt of a chat example (TRL SDFT's construction): ``template``
    filled with the prompt (a conversation's last user turn) and the ``privileged_context`` column,
    or the reference completion where there is none; rendered like the student's prompt."""
    prompt, completion = split_prompt(example)
    context = message_text(example["privileged_context"] if example.get("privileged_context") else completion)
    if isinstance(prompt, list):
        last = prompt[-1]
        if last.get("role") != "user":
            raise ValueError(f"a conversation's prompt does not end with a user turn: {prompt!r}")
        turn = {"role": "user", "content": template.format(prompt=message_text(last["content"]), privileged_context=context)}
        return _chat_ids(tokenizer, [*prompt[:-1], turn], generation_prompt=True)
    return list(tokenizer(template.format(prompt=prompt, privileged_context=context))["input_ids"])


def tokenize_examples(tokenizer, ds: Dataset, max_length: int, max_examples: int | None = None,
                      teacher_template: str | None = None) -> Dataset:
    """Chat / instruction examples → ``input_ids``, ``attention_mask`` and ``labels`` (−100 on the
    prompt), cut to ``max_length`` tokens; examples left with no completion token are dropped.
    With ``teacher_template``, also the demonstration teacher's prompt (``TEACHER_PROMPT`` column,
    :func:`teacher_prompt_ids`)."""
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    if teacher_template is not None:
        rows[TEACHER_PROMPT] = []
    for example in ds:
        ids, n_prompt = example_ids(tokenizer, example)
        ids = ids[:max_length]
        if n_prompt >= len(ids):
            continue
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * n_prompt + ids[n_prompt:])
        if teacher_template is not None:
            rows[TEACHER_PROMPT].append(teacher_prompt_ids(tokenizer, example, teacher_template))
        if max_examples is not None and len(rows["input_ids"]) >= max_examples:
            break
    if not rows["input_ids"]:
        raise ValueError(
            f"no example has a completion token within max_length={max_length} (block_size): raise it, "
            "or check that the examples have non-empty completions"
        )
    return Dataset.from_dict(rows)


def pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    """A right-padded batch of examples with ``input_ids`` (and optional ``labels``): ``input_ids``,
    ``attention_mask`` (0 on padding) and ``labels`` (−100 on padding; ``input_ids`` where absent),
    plus any other per-position column (e.g. a teacher cache's), zero-padded. Values may be
    lists, tensors or numpy arrays. Also the data collator of the recovery job's trainers."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    extra = [k for k, v in rows[0].items()
             if k not in batch and k != TEACHER_PROMPT and isinstance(v, (list, torch.Tensor, np.ndarray))]
    if TEACHER_PROMPT in rows[0]:
        prompts = [list(r[TEACHER_PROMPT]) for r in rows]
        batch[TEACHER_PROMPT] = torch.full((len(rows), max(map(len, prompts))), RAGGED_FILL, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            batch[TEACHER_PROMPT][i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.as_tensor(row.get("labels", row["input_ids"]))
        for key in extra:
            value = torch.as_tensor(row[key])
            if key not in batch:
                batch[key] = value.new_zeros((len(rows), width, *value.shape[1:]))
            batch[key][i, :n] = value
    return batch


def as_batches(dataset: Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The dataset in order as :func:`pad` batches of ``batch_size`` examples."""
    return [pad(dataset.select(range(i, min(i + batch_size, len(dataset)))).to_list())
            for i in range(0, len(dataset), batch_size)]


def model_inputs(batch: dict) -> dict:
    """The forward inputs of a batch from :func:`as_batches` (no labels)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def tokenize_probe(probe, tokenizer, max_tokens: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed, padded CKA probe batches holding at most ``max_tokens`` real tokens in all.

    ``probe``: strings (needs ``tokenizer``), or examples with ``input_ids`` (and optionally
    ``attention_mask``). Rows of fewer than 4 tokens are skipped (debiased HSIC needs 4).
    """
    rows: list[list[int]] = []
    budget = max_tokens
    for example in probe:
        if isinstance(example, str):
            if tokenizer is None:
                raise ValueError("the probe set holds text: pass tokenizer= or use a Trainer with a processing_class")
            ids = tokenizer(example)["input_ids"]
        else:
            ids = list(example["input_ids"])
            if "attention_mask" in example:
                ids = [t for t, m in zip(ids, example["attention_mask"]) if m]
        ids = ids[:budget]
        if len(ids) >= 4:
            rows.append(ids)
            budget -= len(ids)
        if budget <= 0:
            break
    if not rows:
        raise ValueError("the CKA probe set has no example with at least 4 tokens")
    return [model_inputs(b) for b in as_batches(Dataset.from_dict({"input_ids": rows}), batch_size)]


@dataclass
class HeldOut:
    """A held-out set: perplexity batches (labels say which tokens are scored), the probe
    examples and their CKA batches."""

    batches: list
    probe: Dataset
    probe_batches: list


def held_out(tokenizer, ds: Dataset, fmt: str, *, block_size: int, max_items: int | None, probe_items: int,
             text_field: str = "text", batch_size: int = 16) -> HeldOut:
    """Held-out text packed in blocks (plain text) or tokenized examples (chat; perplexity over the
    completions); the first ``probe_items`` blocks / examples are the CKA probe set."""
    if fmt == "text":
        items = pack_blocks(tokenizer, texts_of(ds, text_field), block_size, max_items)
    else:
        items = tokenize_examples(tokenizer, ds, block_size, max_items)
    probe = items.select(range(min(probe_items, len(items))))
    return HeldOut(as_batches(items, batch_size), probe, tokenize_probe(probe, None, len(probe) * block_size, 8))


# --- issue 26 item 8: memory bounded by the batch, not the corpus ---------------------------------
# Plain text is read, tokenized (a batched, lazy Dataset.map) and packed a batch at a time into an
# Arrow file in a temporary folder (memory-mapped), never the whole corpus as Python lists, nor a
# tokenized copy of it; no labels column (pad() derives labels = input_ids). The blocks are those
# of pack_blocks, in the same order.

PIECE_CHARS = 1 << 15  # a document longer than this is tokenized in pieces where that is exact
MAP_BATCH = 32  # rows (documents or pieces) tokenized at a time: ~1M characters at most for pieces


def _arrow_dir() -> str:
    """A fresh folder for this process's Arrow files, removed at exit (a fresh one per call: a
    cache keyed on a file's name would serve stale blocks after the file changed)."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="hf-sdft-data-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _fresh() -> str:
    import uuid

    return uuid.uuid4().hex


def splits_at_line_ends(tokenizer) -> bool:
    """Whether tokenizing a text in pieces cut after a ``\\n`` between two non-space characters gives
    the whole text's tokens: true for byte-level BPE with the GPT-2 split regex and no prefix space
    or normalizer (GPT-2, Llama 3, Qwen, the embedded model), whose pre-tokens never cross that point."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    state = json.loads(backend.to_str())
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    return (state.get("normalizer") is None and len(steps) == 1 and len(byte_level) == 1
            and not byte_level[0].get("add_prefix_space") and byte_level[0].get("use_regex", True))


_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _txt_chunks(path: Path, size: int = 1 << 22) -> Iterator[str]:
    """The file's text (universal newlines, as ``read_text``) in chunks; a bad byte names the file and offset."""
    with path.open("rb") as raw:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        carry_cr = False
        while True:
            data = raw.read(size)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character, decoded with data
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise not_utf8(path, err, offset - pending + err.start) from None
            offset += len(data)
            if carry_cr:
                text = "\r" + text
            carry_cr = text.endswith("\r") and bool(data)
            if carry_cr:
                text = text[:-1]
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if not data:
                return


def txt_documents(path: str | Path, sample_by: str = "document",
                  piece_chars: int | None = None) -> Iterator[tuple[str, bool, bool]]:
    """``(text, first, last)`` pieces of the documents of a ``.txt`` file, as :func:`read_txt` splits
    them, read in chunks: ``first`` / ``last`` mark a document's first and last piece (a ``document``
    holds several pieces only when it is read whole otherwise: the file as one document)."""
    if sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"txt_sample_by={sample_by!r}: choose one of {', '.join(TXT_SAMPLE_BY)}")
    path = Path(path)
    if sample_by == "document":  # one document: pieces cut where tokenization allows (see pack_arrow)
        if not piece_chars:
            text = "".join(_txt_chunks(path))
            if text.strip():
                yield text, True, True
            return
        buffer, pending, first = "", None, True
        for chunk in _txt_chunks(path):
            buffer += chunk
            while len(buffer) > piece_chars:
                cut = _CUT.search(buffer, piece_chars)
                if cut is None or cut.end() >= len(buffer):
                    break
                if pending is not None:
                    yield pending, first, False
                    first = False
                pending, buffer = buffer[:cut.end()], buffer[cut.end():]
        if pending is not None:
            yield pending, first, False
            first = False
        if buffer or not first:
            yield buffer, first, True
        return
    if sample_by == "line":
        carry = ""
        for chunk in _txt_chunks(path):
            lines = (carry + chunk).split("\n")
            carry = lines.pop()
            for line in lines:
                for doc in (line + "\n").splitlines():
                    if doc.strip():
                        yield doc, True, True
        for doc in carry.splitlines():
            if doc.strip():
                yield doc, True, True
        return
    sep, carry = re.compile(r"\n[ \t]*\n"), ""
    for chunk in _txt_chunks(path):  # a separator ends before a chunk's last part: parts[:-1] are exact
        parts = sep.split(carry + chunk)
        carry = parts.pop()
        for p in parts:
            if p.strip("\n").strip():
                yield p.strip("\n"), True, True
    if carry.strip("\n").strip():
        yield carry.strip("\n"), True, True


def txt_dataset(path: str | Path, sample_by: str = "document", piece_chars: int | None = None):
    """A ``.txt`` file's documents (:func:`txt_documents`) as a streaming ``IterableDataset`` read
    from the file as it is iterated: ``text``, ``first``, ``last`` (one row a document, or a piece
    of a long document)."""
    from datasets import Features, IterableDataset, Value

    def rows(path, sample_by):
        for text, first, last in txt_documents(path, sample_by, piece_chars):
            yield {"text": text, "first": first, "last": last}

    features = Features({"text": Value("string"), "first": Value("bool"), "last": Value("bool")})
    return IterableDataset.from_generator(rows, features=features, gen_kwargs={"path": str(path),
                                                                                 "sample_by": sample_by})


def _tokenize_batch(batch: dict, tokenizer, text_field: str, pieces: bool) -> dict:
    """Batched ``Dataset.map``: each row's tokens as :func:`document_ids` gives them; rows that are
    pieces of one document (``first`` / ``last`` not both true) get the special tokens only at the
    document's ends."""
    texts = batch[text_field]
    firsts = batch["first"] if pieces else [True] * len(texts)
    lasts = batch["last"] if pieces else [True] * len(texts)
    keep = [isinstance(t, str) and (bool(t.strip()) or not (f and l)) for t, f, l in zip(texts, firsts, lasts)]
    whole = tokenizer([t if k else "" for t, k in zip(texts, keep)])["input_ids"]
    bare = tokenizer([t if k else "" for t, k in zip(texts, keep)], add_special_tokens=False)["input_ids"] \
        if pieces and not all(firsts) or pieces and not all(lasts) else whole
    frame_with, frame_bare = tokenizer("x")["input_ids"], tokenizer("x", add_special_tokens=False)["input_ids"]
    start = frame_with.index(frame_bare[0]) if frame_bare and frame_bare[0] in frame_with else 0
    prefix, suffix = frame_with[:start], frame_with[start + len(frame_bare):]
    eos = tokenizer.eos_token_id
    out = []
    for k, w, b, first, last in zip(keep, whole, bare, firsts, lasts):
        if not k:
            out.append([])
            continue
        ids = list(w) if first and last else (prefix if first else []) + list(b) + (suffix if last else [])
        if last and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return {"ids": out}


def _blocks(batches: Iterator[dict], block_size: int, max_blocks: int | None):
    """Rows ``{"input_ids", "attention_mask"}`` of ``block_size`` tokens cut from the documents'
    concatenated tokens, read from ``batches`` of tokenized documents (``{"ids": [[...], ...]}``)."""
    carry = np.zeros(0, dtype=np.int64)
    n = 0
    ones = [1] * block_size
    for batch in batches:
        flat = [t for ids in batch["ids"] for t in ids]
        carry = np.concatenate([carry, np.asarray(flat, dtype=np.int64)])
        full = len(carry) // block_size
        for i in range(full):
            yield {"input_ids": carry[i * block_size:(i + 1) * block_size].tolist(), "attention_mask": ones}
            n += 1
            if max_blocks is not None and n >= max_blocks:
                return
        carry = carry[full * block_size:]


def pack_arrow(tokenizer, ds, block_size: int, max_blocks: int | None = None, text_field: str = "text") -> Dataset:
    """:func:`pack_blocks`' blocks, in its order, built a batch at a time into Arrow files on disk
    (memory-mapped): documents tokenized by a batched ``Dataset.map``, packed by a generator.
    ``ds``: a Dataset or a streaming IterableDataset with ``text_field`` (and ``first`` / ``last``
    from :func:`txt_dataset`). Rows hold ``input_ids`` and ``attention_mask``; no ``labels``
    column (the collator :func:`pad` sets labels = input_ids)."""
    from datasets import Features, Sequence, Value

    columns = column_names(ds)
    pieces = {"first", "last"} <= set(columns)
    kwargs = dict(batched=True, batch_size=MAP_BATCH, remove_columns=columns,
                  fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "pieces": pieces})
    if isinstance(ds, Dataset):  # tokenized lazily, batch by batch: no tokenized copy of the corpus on disk
        ds = ds.to_iterable_dataset()
    tokenized = ds.map(_tokenize_batch, **kwargs)
    features = Features({"input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8"))})

    seen = {"tokens": 0, "blocks": 0, "done": False}

    def counted():
        for batch in tokenized.iter(batch_size=MAP_BATCH):
            seen["tokens"] += sum(map(len, batch["ids"]))
            yield batch

    def gen():  # a fresh folder and fingerprint: never a stale cache
        for block in _blocks(counted(), block_size, max_blocks):
            seen["blocks"] += 1
            yield block
        seen["done"] = True

    try:
        return Dataset.from_generator(gen, features=features, cache_dir=_arrow_dir(), fingerprint=_fresh())
    except DatasetGenerationError as err:  # reading the data failed: our error names the file, raise it
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise
    except Exception:
        if seen["blocks"] or not seen["done"]:  # not the empty generator datasets refuses
            raise
        if not seen["tokens"]:  # datasets refuses an empty generator: say why it was empty
            raise ValueError(f"dataset field {text_field!r} holds no text") from None
        raise ValueError(f"the text holds too few tokens ({seen['tokens']}): not enough for one block of "
                         f"{block_size}; give more text or a smaller block_size") from None


def train_examples(*, dataset_name=None, dataset_config_name=None, data_file=None, split="train",
                   txt_sample_by="document", streaming=False, piece_chars=None):
    """:func:`load_examples` for training data, never whole in memory: a ``.txt`` file as
    :func:`txt_dataset` (Arrow on disk), a Hub dataset streamed when ``streaming``; other files as
    ``datasets`` reads them (Arrow, memory-mapped)."""
    if data_file is not None and Path(data_file).suffix == ".txt" and Path(data_file).is_file():
        if Path(data_file).stat().st_size == 0:
            raise ValueError(f"data file {data_file} is empty: give a file that holds text")
        return txt_dataset(data_file, txt_sample_by, piece_chars)
    if data_file is None and dataset_name is not None and streaming:
        return load_dataset(dataset_name, dataset_config_name, split=split, streaming=True)
    return load_examples(dataset_name=dataset_name, dataset_config_name=dataset_config_name, data_file=data_file,
                         split=split, txt_sample_by=txt_sample_by)
