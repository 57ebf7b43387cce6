"""Run by tests/trainer/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2`:
measures CKA and perplexity with every rank taking part, rank 0 writes the result."""

import json
import sys

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from hf_sdft.cka.measure import measure_cka
from hf_sdft.jobs.evaluation import perplexity


def main(student_dir: str, teacher_dir: str, batches_file: str, out_file: str) -> None:
    state = PartialState(cpu=True)  # initialises the gloo process group
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    batches = torch.load(batches_file)
    _, cka = measure_cka(student, teacher, batches)
    _, debiased = measure_cka(student, teacher, batches, debiased=True)
    ppl = perplexity(student, batches)
    if state.is_main_process:
        result = {"world_size": state.num_processes, "cka": cka.tolist(), "cka_debiased": debiased.tolist(), "ppl": ppl}
        with open(out_file, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
