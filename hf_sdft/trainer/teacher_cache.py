"""Offline teacher outputs: run the teacher once over the training data and keep, per position,
its top-k next-token log-probabilities and the log-mass of every other token; the trainers then
distil from that ``datasets`` folder without loading the teacher (``hf-sdft cache-teacher``)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from hf_sdft.data import pad
from hf_sdft.modeling import check_vocabularies, output_vocab_size


@dataclass
class CacheArguments:
    """``hf-sdft cache-teacher``'s own field (the rest comes from the recipe)."""

    top_k: int = field(default=64, metadata={"help": "Teacher tokens kept per position (the rest is one tail bucket)."})


CACHE_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
META_KEY = "hf_sdft_teacher_cache"
FEATURES = Features({  # compact on disk: 4-byte ids and float32 log-probabilities
    "input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8")), "labels": Sequence(Value("int32")),
    "teacher_topk_ids": Sequence(Sequence(Value("int32"))), "teacher_topk_logprobs": Sequence(Sequence(Value("float32"))),
    "teacher_tail_logprob": Sequence(Value("float32")),
})


def cache_metadata(dataset) -> dict | None:
    """The cache's settings (``top_k``, ``temperature``, ``vocab_size``, ``teacher``) when
    ``dataset`` holds cached teacher outputs, else None."""
    names = getattr(dataset, "column_names", None) or []
    if not all(c in names for c in CACHE_COLUMNS):
        return None
    try:
        return json.loads(dataset.info.description or "{}").get(META_KEY) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


@torch.no_grad()
def topk_outputs(teacher, batch: dict, top_k: int, temperature: float) -> dict[str, torch.Tensor]:
    """Per position of ``batch``: the teacher's top-k token ids (int32) and log-probabilities at
    ``temperature`` ``(B, T, k)``, and the log of the probability left to the other tokens ``(B, T)``."""
    device = next(teacher.parameters()).device
    logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = log_p.topk(top_k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1)  # exactly -inf when k = V
    return {"teacher_topk_ids": ids.int().cpu(), "teacher_topk_logprobs": values.cpu(), "teacher_tail_logprob": tail.cpu()}


def teacher_identity(teacher, tokenizer=None, dataset: Dataset | None = None, block_size: int | None = None) -> dict:
    """What a cache was made from: the teacher's config and weights (sha256 of every tensor), the
    tokenizer's vocabulary hash, the block size, and the tokens of the data (sha256 of the
    ``input_ids``, read in batches)."""
    config = json.dumps(teacher.config.to_diff_dict(), sort_keys=True, default=str)
    weights = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().float().cpu().numpy().tobytes())
    identity = {"teacher_config": hashlib.sha256(config.encode()).hexdigest()[:16],
                "teacher_weights": weights.hexdigest()[:16], "block_size": block_size}
    if tokenizer is not None:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        identity["tokenizer"] = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    if dataset is not None:
        data = hashlib.sha256()
        for batch in dataset.select_columns(["input_ids"]).iter(batch_size=1024):
            for ids in batch["input_ids"]:
                data.update(json.dumps(list(ids)).encode())
        identity["data"] = data.hexdigest()[:16]
    return identity


IDENTITY_ITEMS = {"teacher_config": "the teacher's config", "teacher_weights": "the teacher's weights",
                  "tokenizer": "the tokenizer", "block_size": "the block size", "data": "the training data"}


def shard_checksums(folder: str | Path) -> dict[str, str]:
    h = {}
    for path in sorted(Path(folder).glob("*.arrow")):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        h[path.name] = digest.hexdigest()
    return h


def verify_cache(folder: str | Path, identity: dict) -> dict:
    """The cache's ``sdft_cache.json`` once its shards are intact (same checksums) and it was made
    from what ``identity`` (:func:`teacher_identity`) describes; else a ValueError naming the item."""
    folder = Path(folder)
    meta_file = folder / "sdft_cache.json"
    if not meta_file.is_file():
        raise ValueError(f"teacher_cache={folder} has no sdft_cache.json: write it with hf-sdft cache-teacher")
    meta = json.loads(meta_file.read_text())
    recorded = meta.get("shards")
    if recorded is None:
        raise ValueError(f"teacher_cache={folder} was written by an older hf-sdft without checksums nor the teacher's "
                         "fingerprint: write it again with hf-sdft cache-teacher")
    found = shard_checksums(folder)
    for name, digest in recorded.items():
        if name not in found:
            raise ValueError(f"teacher_cache={folder}: shard {name} is missing: write the cache again")
        if found[name] != digest:
            raise ValueError(f"teacher_cache={folder}: shard {name} is truncated or corrupt (its checksum differs "
                             "from the one recorded): write the cache again with hf-sdft cache-teacher")
    for key, what in IDENTITY_ITEMS.items():
        if key in identity and meta.get(key) != identity[key]:
            raise ValueError(f"teacher_cache={folder} does not match this run: {what} differs ({key}: cache "
                             f"{meta.get(key)}, this run {identity[key]}); write the cache again for this run, or "
                             "train with the online teacher")
    return meta


def cache_teacher(teacher, dataset: Dataset, output_dir: str | Path, *, top_k: int = 64, temperature: float = 1.0,
                  batch_size: int = 8, shard_rows: int = 2048, teacher_name: str | None = None,
                  identity: dict | None = None) -> dict:
    """Write ``dataset`` (rows with ``input_ids``, optional ``labels``) plus the teacher's top-k
    outputs to ``output_dir`` (``save_to_disk``). Rows are written in shards of ``shard_rows`` and
    joined memory-mapped, so a cache larger than memory works. Returns the cache's figures;
    ``identity`` (:func:`teacher_identity`) and the shards' checksums are recorded in ``sdft_cache.json``."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size {vocab}")
    if len(dataset) == 0:
        raise ValueError("the dataset to cache is empty: check the training data")
    out = Path(output_dir)
    scratch = Path(tempfile.mkdtemp(prefix="sdft-cache-", dir=out.parent if out.parent.exists() else None))
    teacher.eval()
    started, tokens, shards, rows = time.time(), 0, [], []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="teacher cache", unit="batch"):
            examples = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
            batch = pad(examples)
            cached = topk_outputs(teacher, batch, top_k, temperature)
            for i, example in enumerate(examples):
                n = len(example["input_ids"])
                tokens += n
                rows.append({"input_ids": example["input_ids"], "attention_mask": [1] * n,
                             "labels": example.get("labels", example["input_ids"]),
                             **{k: v[i, :n].tolist() for k, v in cached.items()}})
            if len(rows) >= shard_rows or start + batch_size >= len(dataset):
                path = scratch / f"shard-{len(shards):05d}"
                Dataset.from_list(rows, features=FEATURES).save_to_disk(str(path))
                shards.append(path)
                rows = []
        elapsed = time.time() - started
        joined = concatenate_datasets([load_from_disk(str(p)) for p in shards])
        meta = {"top_k": top_k, "temperature": temperature, "vocab_size": vocab, "teacher": teacher_name,
                "tokens": tokens}
        joined.info.description = json.dumps({META_KEY: meta})
        joined.save_to_disk(str(out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.arrow"))
    meta |= {"bytes": size, "bytes_per_token": size / max(tokens, 1), "tokens_per_second": tokens / max(elapsed, 1e-9),
             **(identity or {}), "shards": shard_checksums(out)}
    tmp = out / ".sdft_cache.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / "sdft_cache.json")
    return meta


def check_cache(meta: dict, args, student) -> None:
    """Raise when cached teacher outputs cannot train this student with these settings."""
    if args.cka_weight > 0:
        raise ValueError("cka_weight > 0 needs the teacher's hidden states, which a teacher cache does not hold: "
                         "set cka_weight 0 or train with the online teacher")
    if meta.get("temperature", 1.0) != args.kd_temperature:
        raise ValueError(f"the teacher cache was written at temperature {meta.get('temperature')} but kd_temperature is "
                         f"{args.kd_temperature}: use the same, or write the cache again")
    if meta.get("vocab_size") is not None:
        check_vocabularies(output_vocab_size(student), meta["vocab_size"], teacher_name="teacher cache")
