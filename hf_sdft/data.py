"""Text datasets for recovery: Hub ids or local .txt/.jsonl/.json/.parquet/.csv files,
tokenized and packed into fixed-length blocks (as transformers' ``run_clm`` does)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def default_model_path() -> str:
    """The small pretrained causal LM shipped inside the package."""
    return str(resources.files("hf_sdft") / "default_model")


def default_data_file(name: str) -> str:
    """A text split shipped with the default model: train, eval, narrow_train, narrow_eval."""
    return str(resources.files("hf_sdft") / "default_data" / f"{name}.txt")


def load_texts(
    *, dataset_name: str | None = None, dataset_config_name: str | None = None, data_file: str | None = None,
    split: str = "train", text_field: str = "text",
) -> list[str]:
    """Texts from a Hub dataset (``dataset_name``) or a local file; empty lines dropped."""
    if data_file is not None:
        path = Path(data_file)
        if not path.exists():
            raise FileNotFoundError(f"data file {data_file} does not exist")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{data_file}: unsupported extension, use one of {', '.join(LOCAL_BUILDERS)}")
        ds = load_dataset(builder, data_files={"data": str(path)}, split="data")
    elif dataset_name is not None:
        ds = load_dataset(dataset_name, dataset_config_name, split=split)
    else:
        raise ValueError("no dataset: set dataset_name or a data file")
    if text_field not in ds.column_names:
        raise ValueError(
            f"dataset has no text field {text_field!r} (columns: {', '.join(ds.column_names)}): set dataset_text_field"
        )
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"dataset field {text_field!r} holds no text")
    return texts


def pack_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None) -> Dataset:
    """Concatenate ``texts`` (each ended by EOS) and cut them into ``block_size``-token blocks.

    Returns a Dataset with ``input_ids``, ``attention_mask`` and ``labels`` (= input_ids).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + eos)
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the text holds {len(ids)} tokens: not enough for one block of {block_size}")
    blocks = torch.tensor(ids[: n * block_size]).view(n, block_size).tolist()
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n, "labels": blocks})


def as_batches(dataset: Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Model-input batches (no labels) from a packed dataset."""
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        out.append({"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"])})
    return out
