"""Two real CPU ranks (gloo DDP) through `accelerate launch --multi_gpu --num_processes 2`
(on CPU, plain `--cpu --num_processes 2` silently runs ONE process: the tests assert the
world size)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sdft.cka.callback import tokenize_probe
from hf_sdft.cka.measure import measure_cka
from hf_sdft.jobs.evaluation import perplexity
from tests.helpers import make_model, make_texts, make_tokenizer, perturb, write_tiny_inputs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def launch(*args, timeout=600, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_cka_and_perplexity_over_two_processes_equal_single_process(tmp_path):
    teacher = make_model()
    student = perturb(copy.deepcopy(teacher))
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    batches = tokenize_probe(make_texts(36, seed=3), make_tokenizer(), max_tokens=4096, batch_size=4)
    assert len(batches) % 2 == 1 and len(batches) >= 7  # uneven: rank 1 runs a discarded padding forward
    torch.save(batches, tmp_path / "batches.pt")
    launch("tests/dist_worker.py", str(tmp_path / "student"), str(tmp_path / "teacher"), str(tmp_path / "batches.pt"),
           str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    _, cka = measure_cka(student, teacher, batches)
    _, debiased = measure_cka(student, teacher, batches, debiased=True)
    assert result["cka"] == pytest.approx(cka.tolist(), rel=1e-9)
    assert result["cka_debiased"] == pytest.approx(debiased.tolist(), rel=1e-9)
    assert result["ppl"] == pytest.approx(perplexity(student, batches), rel=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs the launch really is distributed")
def test_two_processes_without_use_cpu_fail_early(tmp_path):
    proc = launch("-m", "hf_sdft.cli", "recover", "--output_dir", str(tmp_path), "--max_steps", "1", ok=False)
    assert proc.returncode != 0 and "On CPU pass --use_cpu true" in proc.stderr


ON_POLICY = ["--on_policy_ratio", "0.5", "--max_new_tokens", "8", "--prompt_length", "8",
             "--gradient_accumulation_steps", "2", "--logging_steps", "1"]


@pytest.mark.parametrize("extra", [[], ON_POLICY], ids=["off-policy", "on-policy"])
def test_recipe_end_to_end_on_two_ranks(tmp_path, extra):
    write_tiny_inputs(tmp_path)
    out = tmp_path / "out"
    proc = launch("-m", "hf_sdft.cli", "recover", "--config", "recipes/prune-50.yaml",
                  "--model_name_or_path", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.txt"),
                  "--eval_file", str(tmp_path / "eval.txt"), "--output_dir", str(out), "--block_size", "32",
                  "--max_steps", "6", "--save_steps", "3", "--cka_every_n_steps", "3", "--probe_blocks", "8",
                  "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true",
                  "--use_cpu", "true", *extra)
    stats = json.loads((out / "sdft_stats.json").read_text())
    if extra:  # the same on-policy draws on both ranks: whole steps were sampled
        logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "on_policy/fraction" in e]
        assert logs and any(e.get("on_policy/gen_tokens", 0) > 0 for e in logs)
    assert stats["world_size"] == 2
    assert "recovered perplexity" in proc.stdout
    from transformers import AutoModelForCausalLM

    from hf_sdft.compress.prune import sparsity_report
    from hf_sdft.data import as_batches, load_texts, pack_blocks

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sparsity_report(model)["total"] == pytest.approx(0.5, abs=1e-9)
    blocks = pack_blocks(make_tokenizer(), load_texts(data_file=str(tmp_path / "eval.txt")), 32, 200)
    assert stats["perplexity"]["recovered"] == pytest.approx(perplexity(model, as_batches(blocks, 16)), rel=1e-6)
