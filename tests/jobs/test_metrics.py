"""The evaluate metric modules shipped in the package load offline by path and agree with
independent computations."""

import copy
import math

import evaluate
import pytest
import torch

from hf_sdft.metrics import metric_path
from tests.helpers import make_model, make_texts, make_tokenizer, perturb


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric")
    teacher = make_model()
    teacher.save_pretrained(root / "teacher")
    make_tokenizer().save_pretrained(root / "teacher")
    perturb(copy.deepcopy(teacher)).save_pretrained(root / "student")
    make_tokenizer().save_pretrained(root / "student")
    return root


def test_perplexity_metric_matches_transformers_loss(folders):
    texts = make_texts(30, seed=4)
    got = evaluate.load(metric_path("perplexity")).compute(predictions=texts, model_id=str(folders / "teacher"),
                                                           block_size=16)["perplexity"]
    tok = make_tokenizer()
    ids = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    model = make_model()
    with torch.no_grad():  # HF's mean CE per block; every block scores 15 tokens
        nll = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)
    assert got == pytest.approx(math.exp(nll), rel=1e-5)


def test_cka_metric(folders):
    cka = evaluate.load(metric_path("cka"))
    same = cka.compute(predictions=make_texts(10), student_model_id=str(folders / "teacher"),
                       teacher_model_id=str(folders / "teacher"))
    assert same["cka_mean"] == pytest.approx(1.0, abs=1e-9) and set(same["cka_per_layer"]) == {"0", "1"}
    other = cka.compute(predictions=make_texts(10), student_model_id=str(folders / "student"),
                        teacher_model_id=str(folders / "teacher"))
    assert 0 < other["cka_mean"] < 0.99


def test_unknown_metric():
    with pytest.raises(ValueError, match="no shipped metric 'bleu'"):
        metric_path("bleu")
