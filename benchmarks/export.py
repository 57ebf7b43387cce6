"""Export benchmark: recovered students in serving formats, as the engines load them.

    python benchmarks/export.py                       # everything below, both models
    python benchmarks/export.py --parts recipes speed # a part alone
    python benchmarks/export.py --report_only         # rewrite export.md from export.json

Parts:
- ``recipes``: for each model (the embedded Llama, the second Qwen2) the two deployment recipes
  (``w4a16``: symmetric int4 in groups of 128 — 32 on the second model, whose 160 inputs 128 does
  not divide — exported to compressed-tensors; ``gguf-q4_0``: symmetric int4 in groups of 32,
  exported to GGUF) and, at the same budget, the same recipe on quanto's asymmetric grid (exported
  where exact: GGUF Q4_1), plus int8 per channel (GGUF Q8_0) on the embedded model. Each row: teacher →
  degraded → recovered → exported perplexity through transformers and llama.cpp, R, file sizes.
- ``speed``: llama.cpp on the CPU, the recovered Q4_0 and Q8_0 GGUFs against the teacher's F16
  GGUF, same threads, one run: prompt tokens/s and generated tokens/s.
- ``streaming``: export time and peak RSS of a generated Qwen2-shape model of about 1B parameters
  (random weights, float32, saved in 4 shards) to GGUF and to compressed-tensors (dense weights),
  each export in its own process; the target is a peak RSS under 2× the largest shard.

vLLM is not run here (no GPU): the table says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, command, parse_and_load

SECOND = ROOT / "tests" / "assets" / "second_model"
BUDGET = ["--max_steps", "50", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
          "--block_size", "128", "--bf16", "false", "--gradient_checkpointing", "false", "--warmup_steps", "5",
          "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "25", "--cka_every_n_steps", "1000",
          "--learning_rate", "1e-4", "--max_eval_blocks", "32", "--eval_every_n_steps", "10"]  # sized for 2 CPU cores
# 1e-4, not the small-model 1e-3 of the int2 recipes: int4 barely hurts these models, and 1e-3 makes
# every row worse than its start (measured: held-out perplexity up at step 50 on all nine rows)
MODELS = {
    "embedded": [],
    "second": ["--model_name_or_path", str(SECOND / "model"), "--train_file", str(SECOND / "data" / "train.txt"),
               "--eval_file", str(SECOND / "data" / "eval.txt"), "--txt_sample_by", "paragraph"],
}
ROWS = {  # name: (recipe, overrides, export formats, models)
    "w4a16 (symmetric)": ("w4a16", [], "compressed-tensors,gguf", MODELS),
    "w4a16 on quanto's asymmetric grid": ("w4a16", ["--quant_scheme", "asymmetric"], "gguf", MODELS),
    "gguf-q4_0 (symmetric)": ("gguf-q4_0", [], "gguf,compressed-tensors", MODELS),
    "gguf-q4_0 on quanto's asymmetric grid": ("gguf-q4_0", ["--quant_scheme", "asymmetric"], "gguf", MODELS),
    "int8 per channel": ("quanto-int4", ["--quant_weights", "int8", "--quant_group_size", "channel"],
                         "gguf,compressed-tensors", ("embedded",)),
}
SPEED_THREADS = 2
SPEED_PROMPT, SPEED_GENERATE, SPEED_REPEATS = 128, 64, 3
STREAM_SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)  # ≈ 0.98B parameters


def recipe_rows(models, work: Path) -> dict:
    from hf_sdft.cli import _recipe_parser
    from hf_sdft.jobs.recover import run_recovery

    rows = {}
    for model in models:
        for name, (recipe, overrides, formats, on) in ROWS.items():
            if model not in on:
                continue
            group = ["--quant_group_size", "32"] if model == "second" and recipe == "w4a16" else []
            out = work / model / name.split()[0] / ("asym" if "asymmetric" in name else "sym")
            argv = ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *MODELS[model], *BUDGET, *group,
                    *overrides, "--export_formats", formats, "--output_dir", str(out)]
            started = time.time()
            stats = run_recovery(*_recipe_parser().parse_args_and_config(argv))
            rows[f"{model} | {name}"] = {
                "command": command(argv), "seconds": round(time.time() - started, 1),
                "perplexity": stats["perplexity"], "recovery_ratio": stats["recovery_ratio"],
                "degradation": stats["degradation"], "exports": stats["exports"], "kept": stats.get("kept"),
            }
            print(f"{model} | {name}: R {stats['recovery_ratio']:.3f}", flush=True)
    return rows


def _teacher_f16_gguf(model: str, work: Path) -> Path:
    """The teacher in float16, exported to GGUF (F16)."""
    from transformers import AutoTokenizer

    from hf_sdft.data import default_model_path
    from hf_sdft.export import export_student
    from hf_sdft.modeling import from_pretrained

    source = default_model_path() if model == "embedded" else str(SECOND / "model")
    folder = work / model / "teacher-f16"
    if not (folder / "gguf" / "model.gguf").exists():
        from_pretrained(source, dtype=torch.float16).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        export_student(folder, "gguf", folder / "gguf", overwrite=True)
    return folder / "gguf" / "model.gguf"


def llama_speed(path: Path) -> dict:
    """Prompt and generation tokens/s of llama.cpp on ``path`` (best of SPEED_REPEATS)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=SPEED_THREADS, verbose=False, seed=0)
    prompt = [(7 * i + 3) % 1000 + 2 for i in range(SPEED_PROMPT)]
    best_prompt = best_gen = 0.0
    for _ in range(SPEED_REPEATS):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best_prompt = max(best_prompt, SPEED_PROMPT / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(SPEED_GENERATE):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        best_gen = max(best_gen, SPEED_GENERATE / (time.perf_counter() - t))
    llm.close()
    return {"prompt_tokens_per_s": round(best_prompt, 1), "generated_tokens_per_s": round(best_gen, 1),
            "size_bytes": path.stat().st_size}


def speed_rows(models, work: Path) -> dict:
    rows = {}
    for model in models:
        candidates = {"teacher F16": _teacher_f16_gguf(model, work),
                      "recovered Q4_0 (gguf-q4_0)": work / model / "gguf-q4_0" / "sym" / "gguf" / "model.gguf",
                      "recovered Q8_0 (int8)": work / model / "int8" / "sym" / "gguf" / "model.gguf"}
        candidates = {k: v for k, v in candidates.items() if v.exists() or "Q8_0" not in k or model == "embedded"}
        for name, path in candidates.items():
            rows[f"{model} | {name}"] = llama_speed(path) if path.exists() else {"missing": str(path)}
            print(model, name, rows[f"{model} | {name}"], flush=True)
    return rows


def _write_big_model(folder: Path) -> int:
    """A Qwen2-shape model of about 1B parameters, random float32 weights, in 4 shards, written
    shard by shard; returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**STREAM_SHAPE, tie_word_embeddings=True, dtype="float32")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    names = list(shapes)
    total = sum(shapes[n].numel() for n in names)
    shards, current, size = [], [], 0
    for n in names:
        current.append(n)
        size += shapes[n].numel()
        if size >= total / 4 and len(shards) < 3:
            shards.append(current)
            current, size = [], 0
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.randn(shapes[n], generator=g) * 0.02 for n in shard}, str(folder / file),
                  metadata={"format": "pt"})
        weight_map |= {n: file for n in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    from hf_sdft.data import default_model_path

    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)  # a byte-level BPE for the GGUF
    return total


def streaming_rows(work: Path) -> dict:
    folder = work / "big"
    params = _write_big_model(folder)
    largest = max(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = {"largest_shard_bytes": largest, "parameters": params}
    for fmt in ("gguf", "compressed-tensors"):
        out = work / f"big-{fmt}"
        # the child's own high-water mark (VmHWM): ru_maxrss would carry this process's peak
        # across fork + exec (Linux keeps it), i.e. the model generation's, not the export's
        code = ("import re, time; from pathlib import Path; from hf_sdft.export import export_student; "
                f"t = time.time(); r = export_student({str(folder)!r}, {fmt!r}, {str(out)!r}, overwrite=True); "
                "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024; "
                "print(time.time() - t, r.size_bytes, hwm)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds, size, rss = done.stdout.split()[-3:]
        rows[fmt] = {"seconds": round(float(seconds), 1), "output_bytes": int(size), "peak_rss_bytes": int(rss),
                     "rss_over_largest_shard": round(int(rss) / largest, 2)}
        print(fmt, rows[fmt], flush=True)
    return rows


def _ppl(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "not measured"


def ratio(row: dict) -> str:
    """R, or why it means nothing: a degradation within 0.1 % of the teacher's perplexity."""
    p = row["perplexity"]
    if p["degraded"] - p["teacher"] < 1e-3 * p["teacher"]:
        return f"— (gap {p['degraded'] - p['teacher']:.3f})"
    return f"{row['recovery_ratio']:.3f}"


def kept_step(row: dict) -> str:
    """The step whose state the job handed back, of how many (the best held-out perplexity)."""
    kept = row.get("kept")
    return f"{kept['step']} of {kept['last_step']}" if kept else "not recorded"


def report(results: dict) -> str:
    lines = ["# Export benchmark", "",
             "`python benchmarks/export.py` (CPU, 2 cores shared with other jobs; numbers from one run on this "
             "machine). Every recovery: 50 steps × 8 × 128 tokens, float32, learning rate 1e-4, 32 held-out blocks, "
             "held-out perplexity every 10 steps; "
             "the job hands back the state with the best held-out perplexity (kept step: 0 is the degraded start, "
             "when training did not improve on it). R = (degraded − recovered) / (degraded − teacher): where "
             "the degradation barely hurts (int4 and int8 on the embedded model) the gap is small and R is noisy. "
             "Perplexity on each model's held-out text; \"exported\" is the perplexity "
             "of the export as transformers loads it (no hf-sdft) and as llama.cpp (llama-cpp-python 0.3.36, "
             "built from its sdist) runs it. vLLM: not run (no GPU lent to this session).", ""]
    rows = results.get("recipes", {})
    if rows:
        lines += ["## Whole path: teacher → degraded → recovered → exported", "",
                  "| model | recipe | teacher | degraded | recovered | R | kept step | format | exact | size | "
                  "exported (transformers) | exported (llama.cpp) |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
        for key, row in rows.items():
            model, name = key.split(" | ")
            p = row["perplexity"]
            for fmt, e in row["exports"].items():
                lines.append(f"| {model} | {name} | {p['teacher']:.3f} | {p['degraded']:.3f} | {p['recovered']:.3f} | "
                             f"{ratio(row)} | {kept_step(row)} | {fmt} | {'yes' if e['exact'] else 'no'} | "
                             f"{e['size_bytes'] / 1e6:.2f} MB | {_ppl(e['perplexity_transformers'])} | "
                             f"{_ppl(e.get('perplexity_llama_cpp')) if fmt == 'gguf' else 'n/a (not a GGUF)'} |")
        lines += ["", "Commands:", ""] + [f"- {k}: `{r['command']}`" for k, r in rows.items()]
    speed = results.get("speed", {})
    if speed:
        lines += ["", f"## llama.cpp CPU speed ({SPEED_THREADS} threads, prompt {SPEED_PROMPT} tokens, "
                  f"{SPEED_GENERATE} generated, best of {SPEED_REPEATS})", "",
                  "| model | GGUF | size | prompt tokens/s | generated tokens/s |", "|---|---|---:|---:|---:|"]
        for key, row in speed.items():
            model, name = key.split(" | ")
            if "missing" in row:
                lines.append(f"| {model} | {name} | not measured | | |")
                continue
            lines.append(f"| {model} | {name} | {row['size_bytes'] / 1e6:.2f} MB | {row['prompt_tokens_per_s']} | "
                         f"{row['generated_tokens_per_s']} |")
    stream = results.get("streaming", {})
    if stream:
        shard = stream["largest_shard_bytes"]
        lines += ["", "## Streaming export of a ~1B-parameter model", "",
                  f"Qwen2 shape {STREAM_SHAPE} ({stream['parameters'] / 1e9:.2f}B parameters), random float32 weights "
                  f"in 4 shards (largest {shard / 1e9:.2f} GB); each "
                  "export in a fresh process, peak RSS read as its own high-water mark (VmHWM; it includes "
                  "the ~0.55 GB of Python, torch and transformers). Target: peak RSS under 2× the largest shard.", "",
                  "| format | time | output | peak RSS | RSS / largest shard |", "|---|---:|---:|---:|---:|"]
        for fmt in ("gguf", "compressed-tensors"):
            r = stream.get(fmt)
            if r:
                lines.append(f"| {fmt} | {r['seconds']} s | {r['output_bytes'] / 1e9:.2f} GB | "
                             f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['rss_over_largest_shard']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    saved = RESULTS / "export.json"
    a, results = parse_and_load(__doc__, saved, str(RESULTS / "export.md"), models=list(MODELS),
                                parts=["recipes", "speed", "streaming"],
                                extra=[("--work", {"default": str(Path(tempfile.gettempdir()) / "hf-sdft-export-bench")})])
    work = Path(a.work)
    if not a.report_only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        parts = {"recipes": lambda: recipe_rows(a.models, work), "speed": lambda: speed_rows(a.models, work),
                 "streaming": lambda: streaming_rows(work)}
        for part in a.parts:  # saved after each part: a later part's failure keeps the earlier ones
            results[part] = parts[part]()
            saved.write_text(json.dumps(results, indent=2) + "\n")
            Path(a.out).write_text(report(results))
    Path(a.out).write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
