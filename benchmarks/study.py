"""The alignment study (``hf-sdft study``) on two unlike models and three degradations.

    python benchmarks/study.py                                    # everything (about 1 h on 2 CPU cores)
    python benchmarks/study.py --models second --recipes prune-50 --update   # redo one study

Models and data as in ``benchmarks/recovery.py`` (``embedded``: the shipped Llama on KJV text;
``second``: the Qwen2 model on Shakespeare). Each study: the five arms (ce, kd, kd+cka, cka,
head-kd) × three seeds, 100 steps × 8 × 128 tokens, measured every 25 steps on 64 held-out
blocks (CKA on 16 probe blocks). Writes ``benchmarks/results/study.md`` (each study's table,
correlations and verdicts, with its command) and its figures under ``benchmarks/results/study/``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from common import RESULTS, command, parse_and_load
from recovery import MODELS

from hf_sdft.cli import _recipe_parser
from hf_sdft.jobs.study import StudyArguments, run_study
from hf_sdft.jobs.study_report import analyse, report_markdown

FIGURES = RESULTS / "study"
RECIPES = ("quanto-int4", "prune-50", "forgetting")
BUDGET = [
    "--max_steps", "100", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
    "--block_size", "128", "--bf16", "false", "--gradient_checkpointing", "false", "--warmup_steps", "10",
    "--disable_tqdm", "true", "--logging_steps", "50", "--forgetting_steps", "200", "--max_eval_blocks", "64",
    "--probe_blocks", "16", "--measure_points", "4", "--seeds", "0,1,2",
]


def argv_for(model: str, recipe: str, out: Path) -> list[str]:
    flags, narrow = MODELS[model]
    return ["--config", f"recipes/{recipe}.yaml", *flags, *(narrow if recipe == "forgetting" else []), *BUDGET,
            "--output_dir", str(out), "--study_dir", str(out)]


def run_one(model: str, recipe: str, out: Path) -> dict:
    argv = argv_for(model, recipe, out)
    rec, args, model_args, study = _recipe_parser(StudyArguments).parse_args_and_config(argv)
    started = time.time()
    result = run_study(rec, args, model_args, study)
    figures = FIGURES / f"{model}-{recipe}"
    figures.mkdir(parents=True, exist_ok=True)
    for name in ("study_scatter.png", "study_layers.png"):
        shutil.copy(out / name, figures / name)
    return {**result, "command": command(argv, "study"), "seconds": time.time() - started}


def write_report(studies: dict) -> None:
    lines = ["# Alignment study results", "",
             "Made by `python benchmarks/study.py` (see its docstring). Each section is one `hf-sdft study` run; "
             "its command is under its title. Numbers as they came out.", ""]
    verdicts = []
    for key, result in studies.items():
        settings = {"eval_items": 64, "probe_items": 16} | result["settings"]  # BUDGET's, for studies saved without
        result.update(analyse(result["points"], result["teacher_ppl"], settings))  # today's statistics and verdicts
        lines.append(report_markdown(
            result, {"mean CKA vs perplexity": f"study/{key}/study_scatter.png",
                     "per-layer CKA trajectories": f"study/{key}/study_layers.png"},
            title=key, level=2, note=f"`{result['command']}` ({result['seconds'] / 60:.0f} min)"))
        verdicts += [f"- **{key}**: {v}" for v in result["verdicts"]]
    reading = Path(__file__).with_name("study_discussion.md")  # the hand-written reading of the numbers
    lines[4:4] = [*([reading.read_text(), ""] if reading.exists() else []), "## Verdicts, every study", "", *verdicts, ""]
    (RESULTS / "study.md").write_text("\n".join(lines))


def main() -> None:
    a, studies = parse_and_load(__doc__, RESULTS / "study.json", "/tmp/hf-sdft-study", models=MODELS, recipes=RECIPES)
    if not a.report_only:
        for model in a.models:
            for recipe in a.recipes:
                key = f"{model}-{recipe}"
                studies[key] = run_one(model, recipe, Path(a.out) / key)
                (RESULTS / "study.json").write_text(json.dumps(studies, indent=1))
                write_report(studies)
    write_report(studies)


if __name__ == "__main__":
    main()
