"""Offline-safe models (issue 18): transformers' Hub kernels stay off on every model hf-sdft
loads unless ``use_kernels`` is set, so loading and training never fetch kernels from the Hub.

transformers (with the ``kernels`` package installed) defaults ``use_kernels`` to true in
``from_pretrained``; it then kernelizes the model on load and again on ``model.train()``. It maps
no kernel for CPU, so on CPU that default is harmless; :data:`CPU_AS_CUDA` gives CPU the CUDA
mapping, so that a kernelized model fetches ``kernels-community/rotary`` etc. here as on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from hf_sdft import SDFTConfig, SDFTSFTConfig, SDFTSFTTrainer, SDFTTrainer
from hf_sdft.cli import _recipe_parser
from hf_sdft.compress.checkpoint import load_model
from hf_sdft.jobs.recover import load, make_student
from hf_sdft.modeling import from_pretrained
from tests.helpers import cpu_args, make_model, make_texts, make_tokenizer, write_tiny_inputs

ROOT = Path(__file__).resolve().parents[2]
CPU_AS_CUDA = """
from transformers.integrations.hub_kernels import get_kernel_mapping_transformers
for devices in get_kernel_mapping_transformers().values():
    if "cuda" in devices:
        devices["cpu"] = devices["cuda"]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_inputs(tmp_path_factory.mktemp("offline"), n_train=40, n_eval=20)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(root / "model")
    peft.save_pretrained(root / "adapters")
    return root


def kernelized(model) -> bool:
    """transformers' own flag, set by ``kernelize`` (on the base model of a PEFT model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.use_kernels


def job_models(tiny, student: str, *flags):
    """The original and the own student as the recovery job loads them."""
    argv = ["--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
            "--eval_file", str(tiny / "eval.txt"), "--student_name_or_path", str(tiny / student),
            "--block_size", "32", "--probe_blocks", "4", "--use_cpu", "true", *flags]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    original = load(rec, args, model_args)
    return original.model, make_student(original, rec, args, model_args).model


@pytest.mark.parametrize("student", ["model", "adapters"])
@pytest.mark.parametrize("flags, expected", [((), False), (("--use_kernels", "true"), True)])
def test_job_loads_models_with_hub_kernels_off_unless_asked(tiny, student, flags, expected):
    original, own = job_models(tiny, student, *flags)
    assert kernelized(original) is expected and kernelized(own) is expected
    own.train()  # transformers re-kernelizes on train() when kernels are on
    assert kernelized(own) is expected


@pytest.mark.parametrize("use_kernels", [False, True])
def test_loaders_pass_use_kernels(tiny, use_kernels):
    assert kernelized(from_pretrained(str(tiny / "model"), dtype="auto", use_kernels=use_kernels)) is use_kernels
    assert kernelized(load_model(str(tiny / "model"), use_kernels)) is use_kernels
    assert kernelized(load_model(str(tiny / "adapters"), use_kernels)) is use_kernels
    assert not kernelized(load_model(str(tiny / "adapters")))  # the default


@pytest.mark.parametrize("use_kernels", [False, True])
def test_trainers_load_models_by_name_as_use_kernels_says(tiny, tmp_path, use_kernels):
    """The teacher (teacher_model_name_or_path) and an SFT student given by name (TRL loads it)."""
    folder, texts = str(tiny / "model"), make_texts(8)
    args = SDFTConfig(output_dir=str(tmp_path), teacher_model_name_or_path=folder, use_kernels=use_kernels,
                      **cpu_args(max_steps=1))
    trainer = SDFTTrainer(model=make_model(seed=1), args=args, train_dataset=Dataset.from_dict({"text": texts}))
    assert kernelized(trainer.teacher_model) is use_kernels
    sft = SDFTSFTConfig(output_dir=str(tmp_path), teacher_model_name_or_path=folder, use_kernels=use_kernels,
                        **cpu_args(max_steps=1, max_length=32, gradient_checkpointing=False))
    trainer = SDFTSFTTrainer(model=folder, args=sft, processing_class=make_tokenizer(),
                             train_dataset=Dataset.from_dict({"text": texts}))
    assert kernelized(trainer.model) is use_kernels and kernelized(trainer.teacher_model) is use_kernels
    assert sft.model_init_kwargs is None  # the caller's arguments are left as they were


def run_job_offline(tmp_path, *flags, out: str = "out") -> subprocess.CompletedProcess:
    """``hf-sdft recover`` on the embedded default model, offline with an empty Hub and kernels
    cache, Hub kernels allowed by the environment, and CPU mapped to CUDA's kernels."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "USE_HUB_KERNELS": "1", "DISABLE_KERNEL_MAPPING": "0",
                        "HF_HUB_CACHE": str(tmp_path / "hub"), "KERNELS_CACHE": str(tmp_path / "kernels"),
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = CPU_AS_CUDA + "from hf_sdft.cli import main\nmain()\n"
    argv = ["recover", "--output_dir", str(tmp_path / out), "--max_steps", "2", "--max_eval_blocks", "16",
            "--probe_blocks", "4", "--cka_every_n_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true",
            *flags]
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_recover_job_runs_offline_where_transformers_would_fetch_kernels(tmp_path):
    proc = run_job_offline(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "sdft_stats.json").is_file()
    # the same job with kernels on reaches for the Hub, and fails offline: what the default avoids
    proc = run_job_offline(tmp_path, "--use_kernels", "true", out="with-kernels")
    assert proc.returncode != 0 and "kernels-community/" in proc.stderr and "offline" in proc.stderr, proc.stderr[-3000:]
