"""``hf-sdft rewrite`` and ``forgetting_mode: rewrite``: formats kept, checks that keep the
reference, resuming after an interruption, and the forgetting recipe end to end."""

import json
import re

import pytest

from hf_sdft.cli import _recipe_parser, main
from hf_sdft.data import default_data_file
from hf_sdft.jobs.recover import run_recovery
from hf_sdft.jobs.rewrite import KEPT, RewriteArguments, accepted, rewrite_file
from tests.helpers import make_model, write_tiny_inputs


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


QA = [{"prompt": f"what is {i} plus {i}? ", "completion": f"{i} plus {i} is {2 * i}."} for i in range(7)]


def test_checks_keep_the_reference():
    args = RewriteArguments(check_regex=r"plus", answer_regex=r"is (-?\d+)")
    assert accepted("3 plus 3 is 6.", "3 plus 3 is 6.", args)
    assert not accepted("  ", "3 plus 3 is 6.", args)  # empty
    assert not accepted("it is 6.", "3 plus 3 is 6.", args)  # fails check_regex
    assert not accepted("3 plus 3 is 7.", "3 plus 3 is 6.", args)  # another answer
    with pytest.raises(ValueError, match="not a valid regex"):
        RewriteArguments(answer_regex="(")
    with pytest.raises(ValueError, match="must contain {instruction} and {reference}"):
        RewriteArguments(template="rewrite: {reference}")


def test_rewrite_keeps_formats_and_resumes_exactly(tmp_path, tokenizer):
    model = make_model()
    source = write_rows(tmp_path / "qa.jsonl", QA)
    args = RewriteArguments(train_file=str(source), output_file=str(tmp_path / "full.jsonl"), batch_size=3,
                            max_new_tokens=8)
    counts = rewrite_file(model, tokenizer, args)
    full = read_rows(tmp_path / "full.jsonl")
    assert counts == {"rows": 7, "rewritten": counts["rewritten"], "kept": 7 - counts["rewritten"], "skipped": 0}
    assert [r["prompt"] for r in full] == [r["prompt"] for r in QA]
    assert all(isinstance(r["completion"], str) and isinstance(r[KEPT], bool) for r in full)
    # interrupted after 4 rows: the rerun writes the 3 others, the same as one uninterrupted run (greedy)
    partial = tmp_path / "partial.jsonl"
    write_rows(partial, full[:4])
    counts = rewrite_file(model, tokenizer, RewriteArguments(**{**vars(args), "output_file": str(partial)}))
    assert counts["skipped"] == 4 and read_rows(partial) == full


def test_failed_check_keeps_the_reference_in_chat_format(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in QA[:3]]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    args = RewriteArguments(train_file=str(write_rows(tmp_path / "chat.jsonl", rows)),
                            output_file=str(tmp_path / "out.jsonl"), check_regex="^NEVER$", max_new_tokens=4)
    assert rewrite_file(make_model(), tokenizer, args)["kept"] == 3
    out = read_rows(tmp_path / "out.jsonl")
    assert [{k: v for k, v in r.items() if k != KEPT} for r in out] == rows and all(r[KEPT] for r in out)


def test_rewrite_command(tmp_path):
    root = write_tiny_inputs(tmp_path / "tiny")
    source = write_rows(tmp_path / "qa.jsonl", QA[:2])
    main(["rewrite", "--model_name_or_path", str(root / "model"), "--train_file", str(source),
          "--output_file", str(tmp_path / "out.jsonl"), "--max_new_tokens", "4"])
    assert len(read_rows(tmp_path / "out.jsonl")) == 2


def test_forgetting_rewrite_mode_on_the_embedded_model(tmp_path):
    narrow = tmp_path / "narrow.jsonl"
    narrow.write_text("".join(open(default_data_file("narrow_chat_train")).readlines()[:16]))
    argv = ["--config", "recipes/forgetting-rewrite.yaml", "--narrow_train_file",
            str(narrow), "--rewrite_answer_regex", "is (-?[0-9]+)", "--forgetting_steps", "6", "--max_steps", "4",
            "--block_size", "128", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--bf16", "false", "--gradient_checkpointing", "false",
            "--max_eval_blocks", "8", "--probe_blocks", "4", "--use_cpu", "true", "--disable_tqdm", "true",
            "--output_dir", str(tmp_path / "out")]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    stats = run_recovery(rec, args, model_args)
    rewritten = read_rows(tmp_path / "out" / "narrow_rewritten.jsonl")
    assert len(rewritten) == 16
    references = read_rows(narrow)
    for row, ref in zip(rewritten, references, strict=True):  # in order; an accepted rewrite keeps the answer
        assert row["messages"][0] == ref["messages"][0]
        if not row[KEPT]:
            answer = re.search("is (-?[0-9]+)", row["messages"][-1]["content"]).group(1)
            assert answer == re.search("is (-?[0-9]+)", ref["messages"][-1]["content"]).group(1)
    assert set(stats["narrow_perplexity"]) == {"teacher", "degraded", "recovered"}


def test_malformed_source_names_its_line(tmp_path, tokenizer):
    source = write_rows(tmp_path / "qa.jsonl", QA[:2])
    source.write_text(source.read_text() + "{'prompt': 'single quotes'}\n")
    args = RewriteArguments(train_file=str(source), output_file=str(tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match=r"qa\.jsonl line 3 is not valid JSON \(Expecting property name"):
        rewrite_file(make_model(), tokenizer, args)
