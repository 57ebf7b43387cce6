"""The recovery job's data (:func:`load_recovery_data`): training, held-out and narrow-task sets
read as :class:`~hf_sdft.jobs.config.RecoveryArguments` says, prepared by :mod:`hf_sdft.data`."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from hf_sdft.data import (
    DEFAULT_SPLITS,
    PIECE_CHARS,
    HeldOut,
    as_batches,
    data_format,
    default_data_file,
    held_out,
    load_examples,
    model_inputs,
    pack_arrow,
    splits_at_line_ends,
    tokenize_examples,
    train_examples,
)


@dataclass
class RecoveryData:
    """Everything a recovery run reads. ``fmt``: ``"text"`` (packed blocks) or ``"chat"``
    (examples with completion-only labels)."""

    fmt: str
    train: Dataset
    eval: HeldOut
    narrow_train: Dataset | None = None
    narrow_eval: HeldOut | None = None

    def calibration(self, n: int, batch_size: int = 4) -> list[dict]:
        """The first ``n`` training items as model-input batches (Wanda / SparseGPT / activation scales)."""
        return [model_inputs(b) for b in as_batches(self.train.select(range(min(n, len(self.train)))), batch_size)]


def load_recovery_data(rec, tokenizer, default_model: bool, teacher_template: str | None = None) -> RecoveryData:
    """The training, held-out and (when ``rec`` names one or degrades by forgetting) narrow-task
    data of a recovery run; ``rec`` is a :class:`~hf_sdft.jobs.config.RecoveryArguments`. Unset sources
    fall back to the data shipped with the embedded default model (``rec.default_data``). With
    ``teacher_template`` the chat training sets carry the demonstration teacher's prompts."""
    defaults = dict(zip(("train", "eval", "narrow_train", "narrow_eval"), DEFAULT_SPLITS[rec.default_data]))

    def examples(role: str, dataset_name: str | None, data_file: str | None) -> Dataset:
        if data_file is None and dataset_name is None:
            if not default_model:
                raise ValueError(
                    f"no {role} data: set dataset_name or {role}_file (the shipped data only fits the embedded model)"
                )
            data_file = default_data_file(defaults[role])
        split = rec.dataset_test_split if role.endswith("eval") else rec.dataset_train_split
        if role.endswith("train"):  # read as Arrow files / a stream: never whole in memory
            return train_examples(dataset_name=dataset_name, dataset_config_name=rec.dataset_config_name,
                                  data_file=data_file, split=split, txt_sample_by=rec.txt_sample_by,
                                  streaming=rec.streaming and dataset_name is not None,
                                  piece_chars=PIECE_CHARS if splits_at_line_ends(tokenizer) else None)
        return load_examples(dataset_name=dataset_name, dataset_config_name=rec.dataset_config_name,
                             data_file=data_file, split=split, txt_sample_by=rec.txt_sample_by)

    def prepare(ds: Dataset, fmt: str, train: bool):
        if not train:
            return held_out(tokenizer, ds, fmt, block_size=rec.block_size, max_items=rec.max_eval_blocks,
                            probe_items=rec.probe_blocks, text_field=rec.dataset_text_field,
                            batch_size=rec.eval_batch_size)
        if fmt == "text":
            return pack_arrow(tokenizer, ds, rec.block_size, rec.max_train_blocks, rec.dataset_text_field)
        return tokenize_examples(tokenizer, ds, rec.block_size, rec.max_train_blocks, teacher_template=teacher_template)

    def pair(prefix: str, dataset_name: str | None) -> tuple:
        """(train, held-out) of one task, checked to share a format before any tokenization."""
        files = getattr(rec, f"{prefix}train_file"), getattr(rec, f"{prefix}eval_file")
        train, test = (examples(f"{prefix}{role}", dataset_name, f) for role, f in zip(("train", "eval"), files))
        fmt, test_fmt = data_format(train, rec.dataset_text_field), data_format(test, rec.dataset_text_field)
        if fmt != test_fmt:
            raise ValueError(f"the {prefix}training data is {fmt} but the held-out data is {test_fmt}: "
                             "give both in one format")
        return fmt, prepare(train, fmt, True), prepare(test, fmt, False)

    fmt, train, evaluation = pair("", rec.dataset_name)
    data = RecoveryData(fmt=fmt, train=train, eval=evaluation)
    if rec.uses_narrow_task:
        _, data.narrow_train, data.narrow_eval = pair("narrow_", rec.narrow_dataset_name)
    return data

