"""Downstream evaluation through lm-evaluation-harness, offline, on the embedded default model.

The accuracy lm-eval reports on the shipped ``sdft_kjv_nextline`` task is checked against one
computed here from per-option log-likelihoods with plain torch."""

import copy
import json
import math
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_sdft.data import default_model_path  # noqa: E402
from hf_sdft.jobs.downstream import TASKS_DIR, evaluate_tasks, shipped_tasks  # noqa: E402

TASK = "sdft_kjv_nextline"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a tiny model on a shared CPU: 2 threads spin-wait on each other, one is up to 10× faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return AutoModelForCausalLM.from_pretrained(default_model_path()), AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def full_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return evaluate_tasks(model, tokenizer, TASK)[TASK]


def reference_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, float, int]:
    """acc (argmax of the summed log-probs of ``" " + choice`` after the context) and acc_norm
    (the same divided by the choice's length in characters), as lm-eval defines them; and how
    many items have a near-tie between their top two options (where the two may round apart)."""
    hits = hits_norm = ties = 0
    model.eval()
    for item in items:
        ctx = tokenizer(item["context"], add_special_tokens=False).input_ids
        conts = [tokenizer(" " + c, add_special_tokens=False).input_ids for c in item["choices"]]
        width = len(ctx) + max(map(len, conts))
        ids = torch.zeros(len(conts), width, dtype=torch.long)  # right padding: never seen by earlier positions
        for row, cont in enumerate(conts):
            ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.double(), dim=-1)
        ll = torch.stack([
            logprobs[row, len(ctx) - 1 + torch.arange(len(cont)), torch.tensor(cont)].sum()
            for row, cont in enumerate(conts)
        ])
        norm = ll / torch.tensor([len(c) for c in item["choices"]], dtype=torch.double)
        hits += int(ll.argmax()) == item["label"]
        hits_norm += int(norm.argmax()) == item["label"]
        ties += bool((ll.topk(2).values.diff().abs() < 1e-3).item() or (norm.topk(2).values.diff().abs() < 1e-5).item())
    return hits / len(items), hits_norm / len(items), ties


def test_shipped_task_data():
    assert TASK in shipped_tasks()
    items = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    assert len(items) == 200
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["label"] < 4


def test_accuracy_matches_reference_and_beats_chance(model_and_tokenizer, full_scores):
    model, tokenizer = model_and_tokenizer
    items = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    acc, acc_norm, ties = reference_accuracy(model, tokenizer, items)
    n = len(items)
    assert full_scores["acc"] == pytest.approx(acc, abs=ties / n + 1e-12)
    assert full_scores["acc_norm"] == pytest.approx(acc_norm, abs=ties / n + 1e-12)
    for metric in ("acc", "acc_norm"):
        p = full_scores[metric]
        assert 0.0 <= p <= 1.0
        assert full_scores[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-6)
    # 4 options: chance is 0.25, one standard error ≈ 0.031 at n = 200
    assert acc > 0.33 and acc_norm > 0.33, full_scores


def test_limit_and_task_string(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    rng_state = torch.random.get_rng_state()
    scores = evaluate_tasks(model, tokenizer, f" {TASK} ,", limit=20, batch_size=4)
    assert set(scores) == {TASK}
    assert set(scores[TASK]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert all(0.0 <= v <= 1.0 for v in scores[TASK].values())
    items = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()[:20]]
    acc, _, ties = reference_accuracy(model, tokenizer, items)
    assert scores[TASK]["acc"] == pytest.approx(acc, abs=ties / 20 + 1e-12)
    model.train()
    evaluate_tasks(model, tokenizer, [TASK], limit=2)
    assert model.training  # mode restored
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # lm-eval did not reseed the caller's RNG


def test_quantized_model(model_and_tokenizer):
    from hf_sdft.compress.quantize import quantize_student, quantized_modules

    model, tokenizer = model_and_tokenizer
    student = quantize_student(copy.deepcopy(model), "int4")
    assert quantized_modules(student)
    scores = evaluate_tasks(student, tokenizer, TASK, limit=8)[TASK]
    assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0


def test_peft_model(model_and_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = model_and_tokenizer
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero: the wrapped model scores exactly as its base
    assert evaluate_tasks(peft_model, tokenizer, TASK, limit=12) == evaluate_tasks(model, tokenizer, TASK, limit=12)


def test_unknown_task(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=rf"no_such_task.*{TASK}"):
        evaluate_tasks(model, tokenizer, f"{TASK},no_such_task")
    with pytest.raises(ValueError, match=TASK):
        evaluate_tasks(model, tokenizer, " , ")


def test_missing_lm_eval(model_and_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf-sdft\[eval\]"'):
        evaluate_tasks(*model_and_tokenizer, TASK)
