"""``hf-sdft`` command line: recover, degrade, eval, card.

    hf-sdft recover [--config recipes/quanto-int4.yaml] [--field value ...]
    accelerate launch -m hf_sdft.cli recover --config recipes/prune-50.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """usage: hf-sdft {recover,degrade,eval,card} ...

  recover  degrade a model, recover it by self-distillation, print the results table
           (no arguments: the embedded default model, int4, ~5 minutes on 2 CPU cores)
  degrade  write the degraded student only
  eval     perplexity and per-layer CKA of a student against its teacher
  card     (re)build the model card of a recovery output folder

Options of recover/degrade: --config RECIPE.yaml and any field of RecoveryArguments,
SDFTConfig (transformers TrainingArguments + kd_*/cka_*) or TRL's ModelConfig.
"""


def _recipe_parser():
    from trl import ModelConfig, TrlParser

    from .recover import RecoveryArguments, RecoveryConfig

    return TrlParser((RecoveryArguments, RecoveryConfig, ModelConfig))


def cmd_recover(argv: list[str]) -> dict:
    from .recover import format_table, run_recovery

    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    stats = run_recovery(rec, args, model_args)
    if args.process_index == 0:
        print(format_table(stats))
        print(f"saved to {args.output_dir}")
    return stats


def cmd_degrade(argv: list[str]) -> None:
    from .recover import degrade_student, load_teacher_and_data

    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    _, tokenizer, teacher, data = load_teacher_and_data(rec, model_args)
    degradation = rec.build_degradation()
    student = degrade_student(teacher, tokenizer, data, rec, args, degradation)
    if args.should_save:
        (degradation.save if degradation is not None else type(student).save_pretrained)(student, args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"degraded student ({rec.degradation}) saved to {args.output_dir}")


def cmd_eval(argv: list[str]) -> dict:
    from transformers import AutoTokenizer

    from .callbacks import measure_cka, per_layer
    from .data import default_data_file, load_texts
    from .evaluation import load_model, perplexity
    from .recover import held_out

    p = argparse.ArgumentParser(prog="hf-sdft eval", description="Perplexity and per-layer CKA of a student vs its teacher.")
    p.add_argument("--student", required=True, help="folder saved by hf-sdft/transformers (quanto folders detected)")
    p.add_argument("--teacher", required=True, help="the original model: folder or Hub id")
    p.add_argument("--eval_file", default=None, help="held-out text (default: the embedded default's eval split)")
    p.add_argument("--dataset_text_field", default="text")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--max_eval_blocks", type=int, default=200)
    p.add_argument("--probe_blocks", type=int, default=32)
    a = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(a.teacher)
    texts = load_texts(data_file=a.eval_file or default_data_file("eval"), text_field=a.dataset_text_field)
    batches, _, probe_batches = held_out(tokenizer, texts, a.block_size, a.max_eval_blocks, a.probe_blocks)
    student, teacher = load_model(a.student), load_model(a.teacher)
    layers, cka = measure_cka(student, teacher, probe_batches)
    result = {
        "perplexity": {"student": perplexity(student, batches), "teacher": perplexity(teacher, batches)},
        "cka": per_layer(layers, cka),
        "cka_mean": float(cka.mean()),
    }
    print(json.dumps(result, indent=2))
    return result


def cmd_card(argv: list[str]):
    from .cards import cmd_card as build

    return build(argv)


COMMANDS = {"recover": cmd_recover, "degrade": cmd_degrade, "eval": cmd_eval, "card": cmd_card}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
