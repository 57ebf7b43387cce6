"""``hf-sdft`` command line. Each verb is declared once (:data:`VERBS`, by :func:`verb`) and parsed
the same way: TrlParser over the verb's dataclasses, with ``--config RECIPE.yaml`` where it takes one.

    hf-sdft recover [--config recipes/quanto-int4.yaml] [--field value ...]
    accelerate launch -m hf_sdft.cli recover --config recipes/prune-50.yaml
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """A verb: ``run`` is called with one instance of each of ``dataclasses`` (``"module:Class"``
    names, imported only when the verb runs, so that ``hf-sdft --help`` loads no torch)."""

    name: str
    help: str
    run: Callable
    dataclasses: tuple[str, ...]
    config: bool = False  # takes --config RECIPE.yaml
    positional: str | None = None  # a bare first argument is this field's value

    def parser(self):
        from trl import TrlParser

        types = [getattr(importlib.import_module(module), name)
                 for module, name in (spec.split(":") for spec in self.dataclasses)]
        return TrlParser(types, prog=f"hf-sdft {self.name}", description=self.help)

    def parse(self, argv: Sequence[str]) -> tuple:
        argv = list(argv)
        if self.positional and argv and not argv[0].startswith("-"):
            argv[:1] = [f"--{self.positional}", argv[0]]
        parser = self.parser()
        return parser.parse_args_and_config(argv) if self.config else parser.parse_args_into_dataclasses(argv)

    def __call__(self, argv: Sequence[str]):
        return self.run(*self.parse(argv))


VERBS: dict[str, Verb] = {}
RECIPE = ("hf_sdft.jobs.config:RecoveryArguments", "hf_sdft.jobs.config:RecoveryConfig", "trl:ModelConfig")


def verb(name: str, help: str, *dataclasses: str, config: bool = False, positional: str | None = None):
    """Register the decorated function as the verb ``name``."""
    def register(run: Callable) -> Callable:
        VERBS[name] = Verb(name, help, run, dataclasses, config, positional)
        return run

    return register


def usage() -> str:
    width = max(map(len, VERBS))
    recipes = ", ".join(v.name for v in VERBS.values() if v.config)
    return "\n".join([
        f"usage: hf-sdft {{{','.join(VERBS)}}} [--field value ...]", "",
        *(f"  {v.name:<{width}}  {v.help}" for v in VERBS.values()), "",
        f"--config RECIPE.yaml (recipes/) with: {recipes}. Each verb's fields: hf-sdft VERB --help",
    ])


def _recipe_parser():
    """The parser of a recipe's dataclasses (job, training, TRL model fields): ``recover``'s."""
    return VERBS["recover"].parser()


@verb("recover", "degrade a model, recover it by self-distillation, print the results table (no arguments: the "
      "embedded model, int2 in groups of 32, ~2 minutes on 2 CPU cores)", *RECIPE, config=True)
def cmd_recover(rec, args, model_args) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from hf_sdft.jobs.recover import run_recovery
    from hf_sdft.jobs.stats import format_table

    stats = run_recovery(rec, args, model_args)
    if args.process_index == 0:
        print(format_table(stats))
        print(f"saved to {args.output_dir}")
    return stats


@verb("degrade", "write the degraded student only", *RECIPE, config=True)
def cmd_degrade(rec, args, model_args) -> None:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from hf_sdft.jobs.recover import degraded_student, load
    from hf_sdft.jobs.student import save_student

    original = load(rec, args, model_args)
    student = degraded_student(original.model, original.tokenizer, original.data, rec, args)
    if args.should_save:
        save_student(student, original.tokenizer, args.output_dir)
        print(f"degraded student ({rec.degradation}) saved to {args.output_dir}")


@verb("cache-teacher", "run the teacher once over a recipe's training data and save its top-k outputs "
      "(then: recover --teacher_cache DIR)", *RECIPE, "hf_sdft.trainer.teacher_cache:CacheArguments", config=True)
def cmd_cache_teacher(rec, args, model_args, cache) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from pathlib import Path

    import torch

    from hf_sdft.jobs.recover import load
    from hf_sdft.trainer.teacher_cache import cache_teacher, teacher_identity

    original = load(rec, args, model_args)
    identity = teacher_identity(original.model, original.tokenizer, original.data.train, rec.block_size)
    teacher = original.model.to(args.device, args.resolve_teacher_dtype(torch.float32))
    meta = cache_teacher(teacher, original.data.train, args.output_dir, top_k=cache.top_k,
                         temperature=args.kd_temperature, batch_size=args.per_device_train_batch_size,
                         teacher_name=Path(original.path).name if Path(original.path).is_dir() else original.path,
                         identity=identity)
    print(f"teacher cache: {meta['tokens']:,} tokens, top-{cache.top_k}, {meta['bytes_per_token']:.0f} bytes/token, "
          f"{meta['tokens_per_second']:,.0f} tokens/s; saved to {args.output_dir} "
          f"(train from it: hf-sdft recover ... --teacher_cache {args.output_dir})")
    return meta


@verb("study", "does CKA track recovery, and cause it? recover under several arms and seeds, correlate CKA with "
      "perplexity (study.md)", *RECIPE, "hf_sdft.jobs.study:StudyArguments", config=True)
def cmd_study(rec, args, model_args, study) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from hf_sdft.jobs.study import run_study

    result = run_study(rec, args, model_args, study)
    if args.process_index == 0:
        print("\n".join(f"- {line}" for line in result["verdicts"]))
        print(f"study saved to {study.study_dir or args.output_dir + '/study'} (study.md, study.json)")
    return result


@verb("rewrite", "the original model rewrites a fine-tuning set's responses in its own words (resumable)",
      "hf_sdft.jobs.rewrite:RewriteArguments")
def cmd_rewrite(a) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from transformers import AutoTokenizer

    from hf_sdft.compress.checkpoint import load_model
    from hf_sdft.data import default_model_path
    from hf_sdft.jobs.rewrite import rewrite_file
    from hf_sdft.modeling import model_folder

    if a.train_file is None or a.output_file is None:
        raise SystemExit("hf-sdft rewrite needs --train_file DATA.jsonl and --output_file OUT.jsonl")
    name = a.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_folder(name, "model_name_or_path"))
    counts = rewrite_file(load_model(name), tokenizer, a)
    print(f"{counts['rewritten']} of {counts['rows']} responses rewritten, {counts['kept']} references kept "
          f"({counts['skipped']} rows were already done); saved to {a.output_file}")
    return counts


@verb("eval", "perplexity, per-layer CKA (and lm-eval tasks) of a student against its teacher",
      "hf_sdft.jobs.evaluation:EvalArguments", "hf_sdft.jobs.evaluation:EvalDataArguments")
def cmd_eval(ev, rec) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from transformers import AutoTokenizer

    from hf_sdft.cka.measure import measure_cka, per_layer
    from hf_sdft.compress.checkpoint import load_model
    from hf_sdft.data import data_format, default_data_file, held_out, load_examples
    from hf_sdft.jobs.evaluation import perplexity
    from hf_sdft.modeling import model_folder

    tokenizer = AutoTokenizer.from_pretrained(model_folder(ev.teacher, "--teacher"))
    ds = load_examples(data_file=rec.eval_file or default_data_file("eval"), txt_sample_by=rec.txt_sample_by)
    held = held_out(tokenizer, ds, data_format(ds, rec.dataset_text_field), block_size=rec.block_size,
                    max_items=rec.max_eval_blocks, probe_items=rec.probe_blocks, text_field=rec.dataset_text_field,
                    batch_size=rec.eval_batch_size)
    student, teacher = load_model(ev.student), load_model(ev.teacher)
    layers, cka = measure_cka(student, teacher, held.probe_batches)
    result = {
        "perplexity": {"student": perplexity(student, held.batches), "teacher": perplexity(teacher, held.batches)},
        "cka": per_layer(layers, cka),
        "cka_mean": float(cka.mean()),
    }
    if rec.eval_tasks:
        # lazy: lm-evaluation-harness (the [eval] extra) only when tasks are asked for
        from hf_sdft.jobs.downstream import evaluate_tasks

        result["downstream"] = {name: evaluate_tasks(model, tokenizer, rec.eval_tasks, limit=rec.eval_limit)
                                for name, model in (("student", student), ("teacher", teacher))}
    print(json.dumps(result, indent=2))
    return result


@verb("export", "write a saved student for serving, exactly: compressed-tensors (transformers, vLLM, SGLang), gguf "
      "(llama.cpp, Ollama) or dense: hf-sdft export STUDENT_DIR --format F", "hf_sdft.jobs.export:ExportArguments",
      "hf_sdft.jobs.evaluation:EvalDataArguments", positional="student_dir")
def cmd_export(a, data) -> dict:
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from hf_sdft.jobs.export import run_export

    result = run_export(a, data)
    exact = "exact" if result["exact"] else f"re-quantized ({result['rounding']})"
    print(f"{a.format}: {result['grid']}, {exact}, {result['size_bytes'] / 1e6:.2f} MB; written to {a.output_dir}")
    for key in ("perplexity_student", "perplexity_transformers", "perplexity_llama_cpp"):
        if key in result:
            value = result[key]
            print(f"  {key.removeprefix('perplexity_')} perplexity: {value:.4f}" if isinstance(value, float)
                  else f"  {key.removeprefix('perplexity_')} perplexity: {value}")
    return result


@verb("card", "(re)build the model card and plots of a recovery output folder: hf-sdft card FOLDER",
      "hf_sdft.jobs.cards:CardArguments", positional="output_dir")
def cmd_card(a):
    # lazy: a verb imports its job when it runs (hf-sdft --help loads no torch)
    from hf_sdft.jobs.cards import write_card

    path = write_card(a.output_dir, a.repo_id)
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv or argv[0] not in VERBS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nhf-sdft: unknown verb {argv[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    VERBS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
