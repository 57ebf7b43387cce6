"""Issue 26 item 8: plain text packed into Arrow a batch at a time gives pack_blocks' blocks, in
order, without a duplicate labels column; long documents are tokenized in pieces only where that is
exact; --max_train_blocks caps the blocks."""

import random

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from hf_sdft.data import (
    default_data_file,
    default_model_path,
    load_texts,
    pack_arrow,
    pack_blocks,
    pad,
    read_txt,
    splits_at_line_ends,
    txt_dataset,
)
from tests.helpers import make_tokenizer


@pytest.fixture(scope="module")
def embedded():
    return AutoTokenizer.from_pretrained(default_model_path())


def corpus(n_lines, seed=0):
    rng = random.Random(seed)
    words = ["the", "lord", "said", "unto", "moses,", "and", "it", "came", "to", "pass.", "42", "   ", "\t", "é"]
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        lines.append(line + rng.choice(["", " ", "\n", "\n \n", "\r"]))
    return "\n".join(lines)


def test_embedded_data_packs_into_the_same_blocks(embedded):
    texts = load_texts(data_file=default_data_file("train"))
    old = pack_blocks(embedded, texts, 128)
    new = pack_arrow(embedded, Dataset.from_dict({"text": texts}), 128)
    assert "labels" not in new.column_names  # the collator derives them
    assert len(new) == len(old) > 10
    assert new["input_ids"] == old["input_ids"]
    batch, old_batch = pad(new.select(range(4)).to_list()), pad(old.select(range(4)).to_list())
    assert all((batch[k] == old_batch[k]).all() for k in ("input_ids", "attention_mask", "labels"))


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_txt_files_read_in_chunks_give_the_same_blocks(tmp_path, embedded, sample_by):
    assert splits_at_line_ends(embedded)
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(3000), newline="")
    old = pack_blocks(embedded, read_txt(path, sample_by), 64)
    # tiny pieces: a document is tokenized in many pieces, all of them cut exactly
    rows = txt_dataset(path, sample_by, piece_chars=500)
    if sample_by == "document":
        flags = [r["last"] for r in rows]
        assert len(flags) > 20 and sum(flags) == 1
    new = pack_arrow(embedded, rows, 64)
    assert new["input_ids"] == old["input_ids"]


def test_a_character_tokenizer_is_not_cut(tmp_path):
    assert not splits_at_line_ends(make_tokenizer())  # no byte-level split regex: documents stay whole


def test_max_train_blocks_caps_the_blocks(embedded):
    texts = load_texts(data_file=default_data_file("train"))
    new = pack_arrow(embedded, Dataset.from_dict({"text": texts}), 128, max_blocks=5)
    assert new["input_ids"] == pack_blocks(embedded, texts, 128, 5)["input_ids"]


def test_a_streamed_dataset_packs_into_the_same_blocks(tmp_path, embedded):
    from datasets import load_dataset

    texts = load_texts(data_file=default_data_file("train"))
    stream = load_dataset("json", data_files=default_data_file("train"), split="train", streaming=True)
    assert pack_arrow(embedded, stream, 128)["input_ids"] == pack_blocks(embedded, texts, 128)["input_ids"]


MEASURE = """
import resource, sys
from transformers import AutoTokenizer
from hf_sdft.data import default_model_path
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.recovery_data import load_recovery_data
data = load_recovery_data(RecoveryArguments(train_file=sys.argv[1]), AutoTokenizer.from_pretrained(default_model_path()),
                          default_model=True)
print(len(data.train), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_of_the_training_data_does_not_grow_with_the_corpus(tmp_path):
    """The recovery job's data step (read, tokenize, pack) on a ~0.4M- and a ~2M-token .txt (one
    document, txt_sample_by document): peak RSS may grow by 100 MB at most. Measured here: +52 MB;
    the code before grew by 385 MB (the whole corpus as Python lists, tokenized in one call)."""
    import subprocess
    import sys

    rng = random.Random(0)
    words = " ".join(load_texts(data_file=default_data_file("train"))).split()
    peaks, blocks = [], []
    for lines in (10_000, 50_000):  # ~40 tokens a line
        path = tmp_path / f"{lines}.txt"
        path.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(lines)))
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
        n, peak = out.stdout.split()[-2:]
        blocks.append(int(n))
        peaks.append(int(peak) / 1024)
    assert blocks[1] > 4 * blocks[0]
    assert peaks[1] - peaks[0] < 100, f"peak RSS {peaks[0]:.0f} MB → {peaks[1]:.0f} MB"


def test_the_job_streams_a_dataset_and_caps_its_blocks(tmp_path):
    """--streaming true / --max_train_blocks through the recovery job's data step and its parser,
    on a local dataset folder read as a Hub dataset (offline)."""
    import json

    from hf_sdft.cli import _recipe_parser
    from hf_sdft.jobs.recovery_data import load_recovery_data
    from tests.helpers import make_texts

    texts = make_texts(400)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "eval.txt").write_text("\n".join(make_texts(40, seed=2)))
    rec = _recipe_parser().parse_args_and_config([
        "--dataset_name", str(tmp_path / "data"), "--streaming", "true", "--max_train_blocks", "6",
        "--eval_file", str(tmp_path / "eval.txt"), "--block_size", "32"])[0]
    assert rec.streaming and rec.max_train_blocks == 6
    data = load_recovery_data(rec, make_tokenizer(), default_model=False)
    assert data.train["input_ids"] == pack_blocks(make_tokenizer(), texts, 32, 6)["input_ids"]
    with pytest.raises(ValueError, match="max_train_blocks=0 must be at least 1"):
        _recipe_parser().parse_args_and_config(["--max_train_blocks", "0"])


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 22])
def test_a_bad_byte_is_named_at_its_offset_whatever_the_chunking(tmp_path, chunk):
    """Read in chunks, a character split across chunks is decoded whole, and a bad byte after it is
    reported at its offset in the file (as a whole-file read reports it)."""
    from hf_sdft.data import _txt_chunks

    path = tmp_path / "mixed.txt"
    data = "café ünïcode — ".encode() + b"\xe9 and more"
    path.write_bytes(data)
    offset = data.index(b"\xe9 and")
    with pytest.raises(ValueError, match=rf"mixed\.txt is not UTF-8 text: the byte at offset {offset} \(0xe9\)"):
        list(_txt_chunks(path, size=chunk))
    with pytest.raises(ValueError, match=rf"the byte at offset {offset} \(0xe9\)"):
        read_txt(path)


def test_too_little_text_for_one_block_says_so(embedded):
    with pytest.raises(ValueError, match=r"too few tokens \(\d+\): not enough for one block of 512"):
        pack_arrow(embedded, Dataset.from_dict({"text": ["a short line"]}), 512)
    with pytest.raises(ValueError, match="field 'text' holds no text"):
        pack_arrow(embedded, Dataset.from_dict({"text": ["", "  "]}), 8)
