"""``hf-sdft`` command line: recover, degrade, eval, card.

    hf-sdft recover [--config recipes/quanto-int4.yaml] [--field value ...]
    accelerate launch -m hf_sdft.cli recover --config recipes/prune-50.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """usage: hf-sdft {recover,degrade,cache-teacher,study,rewrite,eval,card} ...

  recover        degrade a model, recover it by self-distillation, print the results table
                 (no arguments: the embedded default model, int2 in groups of 32, ~2 minutes on 2 CPU cores)
  degrade        write the degraded student only
  cache-teacher  run the teacher once over a recipe's training data and save its top-k outputs
                 (--top_k 64 --output_dir DIR; then recover with --teacher_cache DIR)
  study          does CKA track recovery, and cause it? recover under several arms (ce, kd, kd+cka,
                 cka, head-kd) and seeds, correlate CKA with perplexity (--arms, --seeds; study.md)
  rewrite        the original model rewrites a fine-tuning set's responses in its own words
                 (--train_file DATA.jsonl --output_file OUT.jsonl; resumable)
  eval           perplexity, per-layer CKA (and lm-eval tasks) of a student against its teacher
  card           (re)build the model card of a recovery output folder

Your own student: hf-sdft recover --model_name_or_path ORIGINAL --student_name_or_path STUDENT

Options of recover/degrade: --config RECIPE.yaml and any field of RecoveryArguments,
SDFTConfig (transformers TrainingArguments + kd_*/cka_*) or TRL's ModelConfig.
"""


def _recipe_parser(*extra):
    """A recipe's dataclasses (job, training, TRL model fields), then any ``extra`` ones."""
    from trl import ModelConfig, TrlParser

    from hf_sdft.jobs.config import RecoveryArguments, RecoveryConfig

    return TrlParser((RecoveryArguments, RecoveryConfig, ModelConfig, *extra))


def cmd_recover(argv: list[str]) -> dict:
    from hf_sdft.jobs.recover import run_recovery
    from hf_sdft.jobs.stats import format_table

    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    stats = run_recovery(rec, args, model_args)
    if args.process_index == 0:
        print(format_table(stats))
        print(f"saved to {args.output_dir}")
    return stats


def cmd_degrade(argv: list[str]) -> None:
    from hf_sdft.compress.student import save_student
    from hf_sdft.jobs.recover import degraded_student, load

    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    original = load(rec, args, model_args)
    student = degraded_student(original.model, original.tokenizer, original.data, rec, args)
    if args.should_save:
        save_student(student, original.tokenizer, args.output_dir)
        print(f"degraded student ({rec.degradation}) saved to {args.output_dir}")


def cmd_cache_teacher(argv: list[str]) -> dict:
    import torch

    from hf_sdft.jobs.recover import load
    from hf_sdft.trainer.teacher_cache import CacheArguments, cache_teacher

    rec, args, model_args, cache = _recipe_parser(CacheArguments).parse_args_and_config(argv)
    original = load(rec, args, model_args)
    teacher = original.model.to(args.device, args.resolve_teacher_dtype(torch.float32))
    meta = cache_teacher(teacher, original.data.train, args.output_dir, top_k=cache.top_k,
                         temperature=args.kd_temperature, batch_size=args.per_device_train_batch_size,
                         teacher_name=original.path)
    print(f"teacher cache: {meta['tokens']:,} tokens, top-{cache.top_k}, {meta['bytes_per_token']:.0f} bytes/token, "
          f"{meta['tokens_per_second']:,.0f} tokens/s; saved to {args.output_dir} "
          f"(train from it: hf-sdft recover ... --teacher_cache {args.output_dir})")
    return meta


def cmd_study(argv: list[str]) -> dict:
    from hf_sdft.jobs.study import StudyArguments, run_study

    rec, args, model_args, study = _recipe_parser(StudyArguments).parse_args_and_config(argv)
    result = run_study(rec, args, model_args, study)
    if args.process_index == 0:
        print("\n".join(f"- {line}" for line in result["verdicts"]))
        print(f"study saved to {study.study_dir or args.output_dir + '/study'} (study.md, study.json)")
    return result


def cmd_rewrite(argv: list[str]) -> dict:
    from transformers import AutoTokenizer, HfArgumentParser

    from hf_sdft.compress.student import load_model, model_folder
    from hf_sdft.data import default_model_path
    from hf_sdft.jobs.rewrite import RewriteArguments, rewrite_file

    (a,) = HfArgumentParser(RewriteArguments).parse_args_into_dataclasses(argv)
    if a.train_file is None or a.output_file is None:
        raise SystemExit("hf-sdft rewrite needs --train_file DATA.jsonl and --output_file OUT.jsonl")
    name = a.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_folder(name, "model_name_or_path"))
    counts = rewrite_file(load_model(name), tokenizer, a)
    print(f"{counts['rewritten']} of {counts['rows']} responses rewritten, {counts['kept']} references kept "
          f"({counts['skipped']} rows were already done); saved to {a.output_file}")
    return counts


def cmd_eval(argv: list[str]) -> dict:
    from transformers import AutoTokenizer

    from hf_sdft.cka.measure import measure_cka, per_layer
    from hf_sdft.compress.student import load_model, model_folder
    from hf_sdft.data import data_format, default_data_file, held_out, load_examples
    from hf_sdft.jobs.evaluation import perplexity

    p = argparse.ArgumentParser(prog="hf-sdft eval", description="Perplexity, per-layer CKA and lm-eval task "
                                "scores of a student vs its teacher.")
    p.add_argument("--student", required=True, help="folder or Hub id (transformers, quanto, PEFT adapters)")
    p.add_argument("--teacher", required=True, help="the original model: folder or Hub id")
    p.add_argument("--eval_file", default=None, help="held-out data (default: the embedded default's eval split)")
    p.add_argument("--dataset_text_field", default="text")
    p.add_argument("--txt_sample_by", default="document", help="document | paragraph | line (.txt files)")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--max_eval_blocks", type=int, default=200)
    p.add_argument("--probe_blocks", type=int, default=32)
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (hf-sdft[eval])")
    p.add_argument("--limit", type=int, default=None, help="cap on examples per lm-eval task")
    a = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_folder(a.teacher, "--teacher"))
    ds = load_examples(data_file=a.eval_file or default_data_file("eval"), txt_sample_by=a.txt_sample_by)
    held = held_out(tokenizer, ds, data_format(ds, a.dataset_text_field), block_size=a.block_size,
                    max_items=a.max_eval_blocks, probe_items=a.probe_blocks, text_field=a.dataset_text_field)
    student, teacher = load_model(a.student), load_model(a.teacher)
    layers, cka = measure_cka(student, teacher, held.probe_batches)
    result = {
        "perplexity": {"student": perplexity(student, held.batches), "teacher": perplexity(teacher, held.batches)},
        "cka": per_layer(layers, cka),
        "cka_mean": float(cka.mean()),
    }
    if a.tasks:
        from hf_sdft.jobs.downstream import evaluate_tasks

        result["downstream"] = {name: evaluate_tasks(model, tokenizer, a.tasks, limit=a.limit)
                                for name, model in (("student", student), ("teacher", teacher))}
    print(json.dumps(result, indent=2))
    return result


def cmd_card(argv: list[str]):
    from hf_sdft.jobs.cards import cmd_card as build

    return build(argv)


COMMANDS = {"recover": cmd_recover, "degrade": cmd_degrade, "cache-teacher": cmd_cache_teacher, "study": cmd_study, "rewrite": cmd_rewrite,
            "eval": cmd_eval,
            "card": cmd_card}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
