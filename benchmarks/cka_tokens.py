"""How far the CKA loss on ``cka_tokens`` sampled positions sits from the CKA on every position
(issue 27): the embedded model against its int2 student (groups of 32, round to nearest) on a
training-sized batch of held-out blocks, per decoder layer, over many draws of the sample.

    python benchmarks/cka_tokens.py [--batch 32] [--draws 50]

Writes ``benchmarks/results/cka_tokens.md``: the full CKA, and per sample size the mean and the
largest absolute deviation of the sampled CKA from it (what the loss sees: 1 − CKA).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import RESULTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sdft.cka.metric import masked_linear_cka, sample_rows
from hf_sdft.compress.quantize import quantize_student
from hf_sdft.data import default_data_file, default_model_path, load_texts, pack_blocks
from hf_sdft.modeling import capture_layers, num_layers

SIZES = (256, 512, 1024, 2048)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="blocks of 128 tokens in the batch (32: 4096 positions)")
    p.add_argument("--draws", type=int, default=50)
    a = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    teacher = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    student = quantize_student(AutoModelForCausalLM.from_pretrained(default_model_path()), "int2", group_size=32).eval()
    blocks = pack_blocks(tokenizer, load_texts(data_file=default_data_file("eval")), 128, max_blocks=a.batch)
    ids = torch.tensor(blocks["input_ids"])
    layers = list(range(num_layers(teacher)))
    with torch.no_grad(), capture_layers(student, layers) as hs, capture_layers(teacher, layers) as ht:
        student(input_ids=ids)
        teacher(input_ids=ids)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    lines = ["# CKA on sampled positions vs every position", "",
             f"`python benchmarks/cka_tokens.py` — embedded model vs its int2 student (groups of 32), {a.batch} held-out "
             f"blocks of 128 tokens ({ids.numel()} positions), {a.draws} draws per sample size, float32, CPU. "
             "Deviation: sampled CKA − full CKA.", "",
             "| layer | full CKA | " + " | ".join(f"{k}: mean dev. / max abs dev." for k in SIZES) + " |",
             "|---|---:|" + "---:|" * len(SIZES)]
    for layer in layers:
        x, y = hs[layer].flatten(0, 1), ht[layer].flatten(0, 1)
        full = masked_linear_cka(x, y, keep.float()).item()
        cells = []
        for k in SIZES:
            devs = []
            for _ in range(a.draws):
                index, weight = sample_rows(keep, k, g)
                devs.append(masked_linear_cka(x[index], y[index], weight).item() - full)
            cells.append(f"{statistics.mean(devs):+.4f} / {max(map(abs, devs)):.4f}")
        lines.append(f"| {layer} | {full:.4f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    (RESULTS / "cka_tokens.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
