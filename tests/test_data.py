"""Data preparation: text read the way the model was trained (documents whole, line breaks kept,
EOS at document ends only), chat / instruction data tokenized as TRL's SFTTrainer does, and clear
errors on bad input."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hf_sdft.data import (
    as_batches,
    default_data_file,
    default_model_path,
    load_examples,
    load_texts,
    pack_blocks,
    read_txt,
    tokenize_examples,
)
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.jobs.recovery_data import load_recovery_data

from .helpers import cpu_args, make_model, make_tokenizer

POEM = "The first line,\nthe second line.\n\nA new paragraph\n  indented here.\n\n\n\nLast one.\n"


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def stream(blocks) -> list[int]:
    return [t for row in blocks["input_ids"] for t in row]


@pytest.mark.parametrize("sample_by,docs", [
    ("document", [POEM]),
    ("paragraph", ["The first line,\nthe second line.", "A new paragraph\n  indented here.", "Last one."]),
    ("line", ["The first line,", "the second line.", "A new paragraph", "  indented here.", "Last one."]),
])
def test_txt_documents_keep_their_line_breaks(tmp_path, sample_by, docs):
    path = tmp_path / "poem.txt"
    path.write_text(POEM)
    assert read_txt(path, sample_by) == docs


def test_packed_txt_stream_is_the_tokenizer_on_the_whole_text(tmp_path, kjv_tokenizer):
    """The v0.1 bug: one example per line, newlines dropped, EOS after every line."""
    text = "\n".join(f"Verse {i}: and it came to pass,\nthat he went up." for i in range(40)) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    eos = kjv_tokenizer.eos_token_id
    expected = kjv_tokenizer(text)["input_ids"] + [eos]
    blocks = pack_blocks(kjv_tokenizer, load_texts(data_file=str(path)), block_size=16)
    assert stream(blocks) == expected[: len(stream(blocks))]
    assert len(expected) - len(stream(blocks)) < 16  # only the last partial block is dropped
    assert stream(blocks).count(eos) == 0 and kjv_tokenizer.encode("\n")[0] in stream(blocks)

    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("one doc\nwith two lines\n\nanother doc\n")
    blocks = pack_blocks(kjv_tokenizer, load_texts(data_file=str(paragraphs), txt_sample_by="paragraph"), 1)
    assert stream(blocks) == (kjv_tokenizer("one doc\nwith two lines")["input_ids"] + [eos]
                              + kjv_tokenizer("another doc")["input_ids"] + [eos])


def test_shipped_text_is_the_models_own_training_documents(kjv_tokenizer):
    """The embedded model was trained on chapters, each tokenized whole and ended by EOS: the
    shipped .jsonl holds one chapter a row, so packing it rebuilds that stream."""
    rows = [json.loads(line)["text"] for line in open(default_data_file("eval"))]
    assert len(rows) == 60 and all("\n" not in r for r in rows)
    blocks = pack_blocks(kjv_tokenizer, load_texts(data_file=default_data_file("eval")), 128, 4)
    expected = kjv_tokenizer(rows[0])["input_ids"] + [kjv_tokenizer.eos_token_id] + kjv_tokenizer(rows[1])["input_ids"]
    assert stream(blocks)[:200] == expected[:200]


def test_bos_of_tokenizers_that_add_one_is_kept(tmp_path):
    """Llama-style tokenizers add BOS: each document starts with it, as in pretraining."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", 0)])
    blocks = pack_blocks(tok, ["ab", "cd"], block_size=1)
    assert stream(blocks) == [0, *tok("ab", add_special_tokens=False)["input_ids"], 1,
                              0, *tok("cd", add_special_tokens=False)["input_ids"], 1]


CHAT = [
    {"messages": [{"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
                  {"role": "user", "content": "what is 1 plus 1?"}, {"role": "assistant", "content": "1 plus 1 is 2."}]},
]


def trl_tokenized(tokenizer, rows):
    """TRL's own SFTTrainer preparation of the same rows (completion-only labels)."""
    from trl import SFTConfig, SFTTrainer

    conversational = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    trainer = SFTTrainer(model=make_model(vocab_size=len(tokenizer)), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(conversational),
                         args=SFTConfig(output_dir="/tmp/unused", max_length=None, **cpu_args(gradient_checkpointing=False)))
    return trainer.train_dataset


def test_chat_examples_match_trls_tokenization(kjv_tokenizer):
    ours = tokenize_examples(kjv_tokenizer, Dataset.from_list(CHAT), max_length=512)
    theirs = trl_tokenized(kjv_tokenizer, CHAT)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    # the labels cover exactly the last assistant turn, "Answer: " excluded, EOS included
    completion = kjv_tokenizer.decode([t for t in ours["labels"][1] if t != -100])
    assert completion == " 1 plus 1 is 2.<|endoftext|>"


def test_prompt_completion_strings_end_with_eos(tokenizer):
    ds = Dataset.from_list([{"prompt": "ab ", "completion": "cd"}])
    row = tokenize_examples(tokenizer, ds, max_length=64)[0]
    assert row["input_ids"] == tokenizer("ab cd")["input_ids"] + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * 3 + row["input_ids"][3:]


def test_chat_perplexity_is_over_completions_only(kjv_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    ds = tokenize_examples(kjv_tokenizer, Dataset.from_list(CHAT), max_length=512)
    nll, count = 0.0, 0
    for row in ds:  # reference: one example at a time, by hand
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        for pos, label in enumerate(row["labels"][1:]):
            if label != -100:
                nll -= logp[pos, label].item()
                count += 1
    assert perplexity(model, as_batches(ds, 2)) == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-5)


def test_recovery_data_reads_the_shipped_chat_splits(kjv_tokenizer):
    data = load_recovery_data(RecoveryArguments(default_data="chat", degradation="forgetting"), kjv_tokenizer, True)
    assert data.fmt == "chat" and data.narrow_train is not None
    first = data.train[0]
    assert first["labels"][0] == -100 and first["labels"][-1] == kjv_tokenizer.eos_token_id


class TestBadInput:
    def test_empty_txt(self, tmp_path):
        (tmp_path / "empty.txt").write_text("\n\n")
        with pytest.raises(ValueError, match="empty.txt is empty: give a file that holds text"):
            load_examples(data_file=str(tmp_path / "empty.txt"))

    def test_conversation_without_assistant(self, kjv_tokenizer):
        ds = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
        with pytest.raises(ValueError, match="no assistant turn"):
            tokenize_examples(kjv_tokenizer, ds, 64)

    def test_chat_data_without_a_chat_template(self, tokenizer):
        with pytest.raises(ValueError, match="tokenizer has no chat template"):
            tokenize_examples(tokenizer, Dataset.from_list(CHAT), 64)

    def test_mixed_formats(self, tmp_path, kjv_tokenizer):
        (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "In the beginning"}) + "\n")
        with pytest.raises(ValueError, match="training data is chat but the held-out data is text"):
            load_recovery_data(RecoveryArguments(default_data="chat", eval_file=str(tmp_path / "eval.jsonl")),
                               kjv_tokenizer, True)

    def test_jsonl_line_that_is_not_json_names_file_and_line(self, tmp_path):
        bad = tmp_path / "data.jsonl"
        bad.write_text('{"text": "a"}\n\n{"text": "c" "d"}\n{"text": "e"}\n')  # line 2 blank, line 3 bad
        with pytest.raises(ValueError, match=r"data\.jsonl line 3 is not valid JSON \(Expecting ',' delimiter at "
                                             r"column 14\): fix or remove that line"):
            load_examples(data_file=str(bad))

    def test_jsonl_line_that_is_not_an_object(self, tmp_path):
        bad = tmp_path / "data.jsonl"
        bad.write_text('{"text": "a"}\n["b"]\n')
        with pytest.raises(ValueError, match=r"data\.jsonl line 2 holds an array, not a JSON object"):
            load_examples(data_file=str(bad))

    def test_jsonl_blank_lines_are_skipped_as_datasets_does(self, tmp_path):
        f = tmp_path / "data.jsonl"
        f.write_text('{"text": "a"}\n\n  \n{"text": "b"}\n')
        assert load_examples(data_file=str(f))["text"] == ["a", "b"]
        (tmp_path / "blank.jsonl").write_text("\n \n")
        with pytest.raises(ValueError, match="blank.jsonl is empty"):
            load_examples(data_file=str(tmp_path / "blank.jsonl"))

    def test_unknown_sample_by(self):
        with pytest.raises(ValueError, match="txt_sample_by='page': choose one of document, paragraph, line"):
            RecoveryArguments(txt_sample_by="page")
