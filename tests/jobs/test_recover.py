"""The recovery job end to end on a tiny model folder: every degradation, LoRA students,
saved outputs that load back, resume, recipes and bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_sdft.cli import _recipe_parser
from hf_sdft.compress.prune import masks_from_zeros, sparsity_report
from hf_sdft.compress.quantize import load_quantized
from hf_sdft.jobs.cards import STATS_FILE
from hf_sdft.jobs.config import RecoveryArguments
from hf_sdft.jobs.recover import run_recovery
from tests.helpers import make_texts, make_tokenizer, write_tiny_inputs

RECIPES = sorted(Path(__file__).resolve().parents[2].glob("recipes/*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_inputs(tmp_path_factory.mktemp("tiny"))
    (root / "narrow_train.txt").write_text("\n".join(["abc abc abd abc."] * 200))
    (root / "narrow_eval.txt").write_text("\n".join(["abc abd abc abc."] * 40))
    return root


def recover(tiny, out, *extra):
    argv = [
        "--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
        "--eval_file", str(tiny / "eval.txt"), "--output_dir", str(out), "--block_size", "32",
        "--max_steps", "8", "--save_steps", "4", "--cka_every_n_steps", "4", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "8", "--probe_blocks", "8", "--use_cpu", "true", *extra,
    ]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    return run_recovery(rec, args, model_args), args


def load_by_card_code(stats, path):
    scope = {}
    exec(stats["loading_code"].replace("{path}", str(path)), scope)
    return scope["model"]


def logits(model, tiny):
    ids = torch.tensor([make_tokenizer()(make_texts(1, seed=9)[0])["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quanto_recovery_saves_an_identical_quantized_student(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int2", "--quant_group_size", "channel")
    saved = json.loads((tmp_path / STATS_FILE).read_text())
    assert saved["perplexity"]["recovered"] == pytest.approx(stats["perplexity"]["recovered"])
    assert set(saved["cka"]["after"]) == {"0", "1"} and saved["world_size"] == 1
    assert [h["step"] for h in saved["cka_history"]] == [0, 4, 8]
    assert saved["format"] == "quanto" and saved["degradation"]["weights"] == "int2"
    model = load_by_card_code(saved, tmp_path)
    from hf_sdft.jobs.evaluation import perplexity
    from hf_sdft.jobs.recovery_data import load_recovery_data

    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    data = load_recovery_data(rec, make_tokenizer(), default_model=False)
    assert perplexity(model, data.eval.batches) == pytest.approx(saved["perplexity"]["recovered"], rel=1e-6)
    assert torch.equal(logits(model, tiny), logits(load_quantized(tmp_path), tiny))


def test_quanto_recovery_with_clip_search_and_learned_scales(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int2", "--quant_group_size", "16",
                       "--quant_clip_search", "true", "--quant_learn_scales", "true", "--calibration_blocks", "8",
                       "--keep_best_model", "false")  # the trained scales, even where the start was better
    saved = json.loads((tmp_path / STATS_FILE).read_text())
    described = saved["degradation"]
    assert described["learned_scales"] is True and "clip_search" in described
    assert 0 < described["clip_groups_shrunk"] <= 1 and 0.5 <= described["clip_mean_ratio"] < 1
    assert saved["recovery"]["quant_scales_lr_ratio"] == 0.1
    card = (tmp_path / "README.md").read_text()
    assert "clipping search" in card and "scales and shifts learned in QAT" in card
    from hf_sdft.jobs.evaluation import perplexity
    from hf_sdft.jobs.recovery_data import load_recovery_data

    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    data = load_recovery_data(rec, make_tokenizer(), default_model=False)
    assert perplexity(load_by_card_code(saved, tmp_path), data.eval.batches) == pytest.approx(
        stats["perplexity"]["recovered"], rel=1e-6)
    assert stats["perplexity"]["recovered"] != stats["perplexity"]["degraded"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_recovery_keeps_exact_sparsity(tiny, tmp_path, pattern):
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--prune_pattern", pattern,
                       "--prune_method", "wanda", "--learning_rate", "1e-2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    report = sparsity_report(model)
    assert report["total"] == pytest.approx(0.5, abs=1e-9)
    assert stats["degradation"]["pattern"] == pattern
    assert stats["perplexity"]["recovered"] != stats["perplexity"]["degraded"]  # it trained


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_recovery_keeps_the_masks_it_made(tiny, tmp_path, pattern):
    from hf_sdft.compress.prune import prune
    from hf_sdft.jobs.recovery_data import load_recovery_data

    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--prune_pattern", pattern,
                       "--prune_method", "sparsegpt", "--learning_rate", "1e-2",
                       "--keep_best_model", "false")  # the trained weights, even where the start was better
    assert stats["degradation"]["method"] == "sparsegpt" and stats["degradation"]["measured_sparsity"] == 0.5
    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    calibration = load_recovery_data(rec, make_tokenizer(), default_model=False).calibration(rec.calibration_blocks)
    degraded = AutoModelForCausalLM.from_pretrained(tiny / "model")
    masks = prune(degraded, 0.5, pattern, "sparsegpt", calibration)
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path)
    found = masks_from_zeros(recovered)
    assert found.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(found[name], mask), name  # exactly the zeros SparseGPT made, kept through training
    modules = dict(recovered.named_modules())
    changed = [not torch.allclose(modules[n].weight, dict(degraded.named_modules())[n].weight) for n in masks]
    assert all(changed)  # the kept weights trained
    assert stats["perplexity"]["recovered"] != stats["perplexity"]["degraded"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_on_policy_recovery_keeps_exact_sparsity(tiny, tmp_path, lora):
    peft = ["--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"] if lora else []
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--on_policy_ratio", "1", "--max_new_tokens", "8",
                       "--prompt_length", "8", "--kd_loss", "reverse_kl", "--learning_rate", "1e-2", *peft)
    assert sparsity_report(AutoModelForCausalLM.from_pretrained(tmp_path))["total"] == pytest.approx(0.5, abs=1e-9)
    assert stats["recovery"]["generation"]["on_policy_ratio"] == 1.0 and stats["recovery"]["lora"] == lora
    assert stats["perplexity"]["recovered"] != stats["perplexity"]["degraded"]


def test_pruned_lora_student_merges_without_losing_sparsity(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--degradation", "prune", "--use_peft", "true", "--lora_r", "4",
                       "--lora_target_modules", "q_proj", "v_proj", "up_proj", "--learning_rate", "5e-2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sparsity_report(model)["total"] == pytest.approx(0.5, abs=1e-9)
    assert stats["recovery"]["lora"] and stats["format"] == "transformers"


def test_quanto_lora_student_keeps_adapters_on_a_quantized_base(tiny, tmp_path):
    stats, _ = recover(tiny, tmp_path, "--quant_weights", "int4", "--quant_group_size", "channel", "--use_peft", "true", "--lora_r", "4",
                       "--learning_rate", "5e-2")
    assert stats["format"] == "quanto+lora"
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "quantized_base" / "quanto_qmap.json").exists()
    model = load_by_card_code(stats, tmp_path)
    from hf_sdft.compress.checkpoint import load_model
    from hf_sdft.jobs.evaluation import perplexity
    from hf_sdft.jobs.recovery_data import load_recovery_data

    rec = RecoveryArguments(train_file=str(tiny / "train.txt"), eval_file=str(tiny / "eval.txt"), block_size=32)
    data = load_recovery_data(rec, make_tokenizer(), default_model=False)
    assert perplexity(model, data.eval.batches) == pytest.approx(stats["perplexity"]["recovered"], rel=1e-5)
    # hf-sdft eval and the metric modules load the same quantized base + adapters
    assert perplexity(load_model(str(tmp_path)), data.eval.batches) == pytest.approx(
        stats["perplexity"]["recovered"], rel=1e-5)


@pytest.mark.parametrize("mode", ["recover", "prevent"])
def test_forgetting_recipe_reports_narrow_and_general_perplexity(tiny, tmp_path, mode):
    stats, _ = recover(tiny, tmp_path, "--degradation", "forgetting", "--forgetting_mode", mode,
                       "--narrow_train_file", str(tiny / "narrow_train.txt"),
                       "--narrow_eval_file", str(tiny / "narrow_eval.txt"), "--forgetting_steps", "10",
                       "--forgetting_learning_rate", "1e-2", "--kd_ratio", "0.5" if mode == "prevent" else "1.0")
    narrow = stats["narrow_perplexity"]
    assert narrow["degraded"] < narrow["teacher"]  # plain SFT learned the narrow task
    assert stats["perplexity"]["degraded"] > stats["perplexity"]["teacher"]  # ...and forgot general text
    assert stats["degradation"]["mode"] == mode


def test_prevent_mode_uses_the_cka_regulariser(tiny, tmp_path):
    narrow = ["--degradation", "forgetting", "--forgetting_mode", "prevent", "--forgetting_steps", "6",
              "--narrow_train_file", str(tiny / "narrow_train.txt"), "--narrow_eval_file", str(tiny / "narrow_eval.txt"),
              "--kd_ratio", "0.5", "--forgetting_learning_rate", "1e-2"]
    kd, _ = recover(tiny, tmp_path / "kd", *narrow)
    with_cka, _ = recover(tiny, tmp_path / "cka", *narrow, "--cka_weight", "1.0")
    assert with_cka["recovery"]["cka_weight"] == 1.0
    assert with_cka["perplexity"]["recovered"] != pytest.approx(kd["perplexity"]["recovered"], rel=1e-6)


class Interrupted(Exception):
    pass


def interrupted(tiny, out, step, monkeypatch, *extra):
    """A run killed right after saving ``checkpoint-<step>``."""
    from transformers import TrainerCallback

    import hf_sdft.jobs.recover as job

    real = job.make_trainer

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupted

    def make_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(Kill())
        return trainer

    monkeypatch.setattr(job, "make_trainer", make_trainer)
    with pytest.raises(Interrupted):
        recover(tiny, out, *extra)
    monkeypatch.setattr(job, "make_trainer", real)


def test_interrupted_run_resumes_with_masks_intact(tiny, tmp_path, monkeypatch):
    interrupted(tiny, tmp_path, 4, monkeypatch, "--degradation", "prune", "--learning_rate", "1e-2")
    masks = masks_from_zeros(AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4"))
    saved = json.loads((tmp_path / "run_fingerprint.json").read_text())
    assert json.loads((tmp_path / "checkpoint-4" / "run_fingerprint.json").read_text()) == saved
    assert not saved["complete"]
    resumed, args = recover(tiny, tmp_path, "--degradation", "prune", "--learning_rate", "1e-2")
    assert resumed["recovery"]["steps"] == 8
    assert [h["step"] for h in resumed["cka_history"]] == [0, 4, 8]  # history from before the interruption kept
    final = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert masks_from_zeros(final).keys() == masks.keys()
    for name, mask in masks_from_zeros(final).items():
        assert torch.equal(mask, masks[name])


def test_interrupted_quanto_run_resumes_quantized(tiny, tmp_path, monkeypatch):
    interrupted(tiny, tmp_path, 4, monkeypatch, "--quant_weights", "int4", "--quant_group_size", "channel")
    resumed, _ = recover(tiny, tmp_path, "--quant_weights", "int4", "--quant_group_size", "channel")
    assert resumed["recovery"]["steps"] == 8
    assert (tmp_path / "quanto_qmap.json").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_parse(recipe):
    rec, args, model_args = _recipe_parser().parse_args_and_config(["--config", str(recipe)])
    assert rec.degradation in ("quanto", "prune", "forgetting")
    assert args.output_dir == f"outputs/{recipe.stem}" and not args.bf16 and not args.fp16  # CPU: float32
    assert rec.build_degradation() is not None or rec.degradation == "forgetting"


@pytest.mark.parametrize("gpu, flags, expected, says", [
    ("bf16", [], (True, False), None),  # e.g. A100: the recipe's bf16
    ("no-bf16", [], (False, True), "training in fp16"),  # T4, V100: fp16 instead of the recipe's bf16
    ("no-bf16", ["--fp16", "false"], (False, False), "training in float32"),  # an explicit choice is kept
    ("no-bf16", ["--fp16", "true"], (False, True), None),
    ("no-bf16", ["--bf16", "false"], (False, False), None),
    (None, [], (False, False), "training in float32"),  # CPU
])
def test_recipe_precision_follows_the_gpu(monkeypatch, gpu, flags, expected, says):
    """The recipes' bf16 where the GPU has it, else fp16 on CUDA (T4, V100), else float32; what
    CUDA reports is simulated here (a CPU machine)."""
    from accelerate.state import AcceleratorState
    from transformers.testing_utils import CaptureLogger

    from hf_sdft.trainer.config import logger  # resolve_mixed_precision logs there

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    # a T4 / V100 reports bf16 unless emulation is excluded, as torch does there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu == "bf16" or including_emulation)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # TrainingArguments picks cuda:0
    try:
        with CaptureLogger(logger) as log:
            _, args, _ = _recipe_parser().parse_args_and_config(["--config", "recipes/quanto-int4.yaml", *flags])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # no simulated CUDA state left for later tests
    assert (args.bf16, args.fp16) == expected
    assert (says in log.out) if says else "bf16 was asked for" not in log.out


def test_recipe_names_all_required_kinds():
    assert {r.stem for r in RECIPES} >= {"quanto-int4", "quanto-int2", "prune-50", "prune-2of4", "forgetting"}


def test_degrade_then_eval_commands(tiny, tmp_path, capsys):
    from hf_sdft.cli import main

    data = ["--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
            "--eval_file", str(tiny / "eval.txt"), "--block_size", "32"]
    main(["degrade", *data, "--degradation", "prune", "--prune_pattern", "2:4", "--output_dir", str(tmp_path / "deg")])
    assert sparsity_report(AutoModelForCausalLM.from_pretrained(tmp_path / "deg"))["total"] == pytest.approx(0.5)
    capsys.readouterr()
    main(["eval", "--student", str(tmp_path / "deg"), "--teacher", str(tiny / "model"),
          "--eval_file", str(tiny / "eval.txt"), "--block_size", "32", "--probe_blocks", "8"])
    result = json.loads(capsys.readouterr().out)
    p = result["perplexity"]
    assert p["student"] != p["teacher"] and set(result["cka"]) == {"0", "1"} and 0 < result["cka_mean"] < 1
    main(["eval", "--student", str(tiny / "model"), "--teacher", str(tiny / "model"),
          "--eval_file", str(tiny / "eval.txt"), "--block_size", "32", "--probe_blocks", "8"])
    same = json.loads(capsys.readouterr().out)
    assert same["perplexity"]["student"] == same["perplexity"]["teacher"] and same["cka_mean"] == pytest.approx(1.0)


def test_card_command_rebuilds_the_card(tiny, tmp_path):
    from hf_sdft.cli import main

    recover(tiny, tmp_path, "--max_steps", "2")
    (tmp_path / "README.md").unlink()
    main(["card", str(tmp_path)])
    assert "## How to load" in (tmp_path / "README.md").read_text()


class TestBadInput:
    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="train_file=/nope.txt does not exist"):
            _recipe_parser().parse_args_and_config(["--train_file", "/nope.txt"])

    def test_no_text_field(self, tiny, tmp_path):
        f = tmp_path / "data.jsonl"
        f.write_text('{"content": "hello there"}\n')
        with pytest.raises(ValueError, match="no text field 'text' \\(columns: content\\): set dataset_text_field"):
            recover(tiny, tmp_path / "out", "--train_file", str(f))

    def test_malformed_jsonl_fails_before_any_training(self, tiny, tmp_path, monkeypatch):
        import hf_sdft.jobs.recover as job

        f = tmp_path / "bad.jsonl"
        f.write_text('{"text": "in the beginning"}\n{"text": "and the earth"}\n{"text": "was without form\n')
        monkeypatch.setattr(job, "make_student", lambda *a: pytest.fail("got past loading the data"))
        with pytest.raises(ValueError, match=r"bad\.jsonl line 3 is not valid JSON \(Unterminated string starting "
                                             r"at column 10\): fix or remove that line"):
            recover(tiny, tmp_path / "out", "--train_file", str(f))

    @pytest.mark.parametrize("flags,msg", [
        (["--quant_weights", "int3"], "unsupported weight bit width 'int3'"),
        (["--degradation", "prune", "--prune_pattern", "3:8:1"], "pattern"),
        (["--degradation", "prune", "--prune_sparsity", "1.0"], "sparsity"),
        (["--degradation", "prune", "--prune_pattern", "2:3"], "divisible"),
        (["--degradation", "distill"], "degradation='distill': choose one of quanto, prune, forgetting, none"),
    ])
    def test_bad_degradation_options(self, tiny, tmp_path, flags, msg):
        with pytest.raises(ValueError, match=msg):
            recover(tiny, tmp_path, *flags)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_with_its_real_model_settings(tiny, tmp_path, recipe):
    """Each recipe as shipped (accumulation, gradient checkpointing, warm-up ratio, bf16 → float32
    on this CPU) on the tiny model; only the model, data, length and budget are overridden."""
    rec, args, _ = _recipe_parser().parse_args_and_config(["--config", str(recipe)])
    assert args.learning_rate <= 2e-5 and args.gradient_accumulation_steps > 1 and args.gradient_checkpointing
    if args.teacher_context == "demonstration" or rec.forgetting_mode == "rewrite":
        pytest.skip("needs chat data: run on the embedded model's chat splits in tests/jobs/test_generation_recipes.py")
    narrow = ["--narrow_train_file", str(tiny / "narrow_train.txt"), "--narrow_eval_file", str(tiny / "narrow_eval.txt"),
              "--forgetting_steps", "2"] if rec.degradation == "forgetting" else []
    default_data = ["--default_data", "text"] if rec.default_data == "chat" else []
    # the tiny model's layers are 32 / 64 wide and its character tokenizer has no GGUF form (tests/export runs the
    # deployment recipes' exports on the real models)
    tiny_fit = ["--quant_group_size", "32"] if rec.quant_group_size.isdigit() and int(rec.quant_group_size) > 32 else []
    tiny_fit += ["--export_formats", "compressed-tensors"] if rec.export_list else []
    stats, args = recover(tiny, tmp_path, "--config", str(recipe), "--max_steps", "2", "--per_device_train_batch_size", "2",
                          *narrow, *default_data, *tiny_fit)
    assert stats["recovery"]["steps"] == 2 and args.gradient_accumulation_steps == 8 and not args.bf16
    assert stats["recovery"]["tokens_seen"] == 2 * 2 * 8 * 32


@pytest.mark.parametrize("mode", ["recover", "prevent"])
def test_chat_forgetting_recipe_on_the_embedded_model(tmp_path, mode):
    """recipes/forgetting-chat.yaml end to end: narrow chat SFT, then recovery on general chat
    (completion-only KD through SDFTSFTTrainer), with the embedded model's small-model settings."""
    argv = ["--config", "recipes/forgetting-chat.yaml", "--forgetting_mode", mode, "--output_dir", str(tmp_path),
            "--block_size", "128", "--learning_rate", "1e-3", "--forgetting_learning_rate", "1e-3",
            "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--gradient_checkpointing",
            "false", "--max_steps", "20", "--forgetting_steps", "20", "--max_eval_blocks", "48", "--probe_blocks", "8",
            "--disable_tqdm", "true", "--save_strategy", "no", "--cka_every_n_steps", "10"]
    if mode == "prevent":
        argv += ["--kd_ratio", "0.5"]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    stats = run_recovery(rec, args, model_args)
    p, narrow = stats["perplexity"], stats["narrow_perplexity"]
    if mode == "recover":
        assert narrow["degraded"] < narrow["teacher"] and p["degraded"] > p["teacher"]  # learned, and forgot
        assert stats["recovery_ratio"] > 0.5
    else:  # one run: the narrow task learned while general chat stays near the original
        assert narrow["recovered"] < narrow["teacher"] and p["recovered"] < p["degraded"]


def test_eval_tasks_score_teacher_degraded_and_recovered(tmp_path):
    """eval_tasks runs lm-evaluation-harness offline on the shipped task; the scores reach the
    stats, the printed table and the card's model-index."""
    pytest.importorskip("lm_eval")
    from huggingface_hub import ModelCard

    from hf_sdft.jobs.stats import format_table

    argv = ["--output_dir", str(tmp_path), "--max_steps", "2", "--max_eval_blocks", "16", "--probe_blocks", "4",
            "--eval_tasks", "sdft_kjv_nextline", "--eval_limit", "12", "--disable_tqdm", "true"]
    rec, args, model_args = _recipe_parser().parse_args_and_config(argv)
    stats = run_recovery(rec, args, model_args)
    scores = stats["downstream"]
    assert set(scores) == {"teacher", "degraded", "recovered"}
    for model in scores.values():
        assert 0.0 <= model["sdft_kjv_nextline"]["acc"] <= 1.0
    assert "sdft_kjv_nextline acc (recovered)" in format_table(stats)
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert {r.metric_name for r in results} >= {f"sdft_kjv_nextline acc ({m})" for m in scores}


def test_cakld_recovery_estimates_and_reports_gamma(tiny, tmp_path):
    stats, args = recover(tiny, tmp_path, "--degradation", "prune", "--kd_loss", "cakld", "--logging_steps", "4")
    assert args.kd_loss == "cakld" and args.cakld_gamma is None
    gamma = stats["recovery"]["cakld_gamma"]
    assert 0.0 < gamma < 1.0
    assert json.loads((tmp_path / STATS_FILE).read_text())["recovery"]["cakld_gamma"] == gamma
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [e["cakld_gamma"] for e in history if "cakld_gamma" in e] == [gamma, gamma]  # logged at steps 4 and 8
    assert stats["perplexity"]["recovered"] < stats["perplexity"]["degraded"]
    given = _recipe_parser().parse_args_and_config(["--kd_loss", "cakld", "--cakld_gamma", "0.4"])[1]
    assert given.cakld_gamma == 0.4


def no_loading(monkeypatch):
    """Fail the test if the job gets as far as loading a model."""
    import hf_sdft.jobs.recover as job

    monkeypatch.setattr(job, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class TestRunFolder:
    """Issue 26.1: a run resumes only its own checkpoints; another run's folder is refused."""

    def test_another_runs_folder_is_refused_naming_the_settings(self, tiny, tmp_path, monkeypatch):
        recover(tiny, tmp_path, "--quant_weights", "int2", "--max_steps", "4", "--save_steps", "2")
        before = snapshot(tmp_path)
        with monkeypatch.context() as m:
            no_loading(m)
            with pytest.raises(FileExistsError, match=r"another run's output: settings differ: learning_rate "
                                                      r"\(0\.001 → 0\.5\); quant_weights \(int2 → int4\); seed \(0 → 7\)"
                                                      r".*--overwrite_output_dir true"):
                recover(tiny, tmp_path, "--quant_weights", "int4", "--learning_rate", "0.5", "--seed", "7",
                        "--max_steps", "4", "--save_steps", "2")
        assert snapshot(tmp_path) == before  # nothing touched
        stats, _ = recover(tiny, tmp_path, "--quant_weights", "int4", "--learning_rate", "0.5", "--seed", "7",
                           "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
                           "--overwrite_output_dir", "true")
        saved = json.loads((tmp_path / STATS_FILE).read_text())
        assert saved["degradation"]["weights"] == "int4" and saved["recovery"]["steps"] == 2
        assert [h["step"] for h in saved["cka_history"]] == [0, 2]  # nothing of the int2 run merged in
        assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
        state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
        assert [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e][0] > 0.1  # the new schedule

    def test_complete_run_exits_without_training(self, tiny, tmp_path, monkeypatch, caplog):
        first, _ = recover(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2")
        before = snapshot(tmp_path)
        no_loading(monkeypatch)
        again, _ = recover(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2")
        assert again["recovery"]["steps"] == 2 and again == json.loads((tmp_path / STATS_FILE).read_text())
        assert snapshot(tmp_path) == before

    def test_runs_without_output_dir_share_the_recipe_folder_and_are_told_apart(self, tiny, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        data = ["--model_name_or_path", str(tiny / "model"), "--train_file", str(tiny / "train.txt"),
                "--eval_file", str(tiny / "eval.txt"), "--block_size", "32", "--max_steps", "2", "--save_steps", "2",
                "--disable_tqdm", "true", "--per_device_train_batch_size", "8", "--probe_blocks", "8"]
        run_recovery(*_recipe_parser().parse_args_and_config(data))
        assert (tmp_path / "outputs" / "quanto-int2" / STATS_FILE).is_file()
        no_loading(monkeypatch)
        with pytest.raises(FileExistsError, match=r"outputs/quanto-int2 holds another run's output: settings differ: "
                                                  r"quant_weights \(int2 → int4\)"):
            run_recovery(*_recipe_parser().parse_args_and_config([*data, "--quant_weights", "int4"]))

    def test_a_folder_with_outputs_but_no_fingerprint_is_refused(self, tiny, tmp_path, monkeypatch):
        (tmp_path / "checkpoint-300").mkdir()
        (tmp_path / STATS_FILE).write_text("{}")
        no_loading(monkeypatch)
        with pytest.raises(FileExistsError, match="without a fingerprint"):
            recover(tiny, tmp_path)

    @pytest.mark.parametrize("steps", ["0", "-1"])
    def test_max_steps_below_one_is_refused(self, steps):
        with pytest.raises(ValueError, match=f"max_steps={steps}: .*give at least 1"):
            _recipe_parser().parse_args_and_config(["--max_steps", steps])


def test_hub_token_is_never_written(tiny, tmp_path):
    """Issue 26.3: a token given on the command line is in no file the run writes."""
    token = "hf_PLANTEDtoken0123456789abcdefXYZ"
    recover(tiny, tmp_path, "--max_steps", "4", "--save_steps", "2", "--hub_token", token)
    written = snapshot(tmp_path)
    assert any(name.endswith("training_args.bin") for name in written)
    assert [name for name, data in written.items() if token.encode() in data] == []


class TestAtomicOutputs:
    """Issue 26.5."""

    def test_plain_save_over_a_quanto_save_loads(self, tmp_path):
        from hf_sdft.compress.checkpoint import load_model
        from hf_sdft.compress.quantize import QuantoDegradation
        from hf_sdft.jobs.student import Student, save_student
        from tests.helpers import make_model

        quantized = make_model()
        degradation = QuantoDegradation(weights="int4", group_size="channel")
        degradation.apply(quantized)
        save_student(Student(quantized, {"kind": "quanto"}, degradation=degradation), make_tokenizer(), tmp_path)
        assert (tmp_path / "quanto_qmap.json").exists()
        plain = make_model(seed=3)
        assert save_student(Student(plain, {"kind": "none"}), make_tokenizer(), tmp_path)[0] == "transformers"
        assert not (tmp_path / "quanto_qmap.json").exists()
        assert torch.equal(logits(load_model(str(tmp_path)), tiny=None), logits(plain, tiny=None))

    def test_a_crash_while_saving_leaves_no_half_written_output(self, tiny, tmp_path, monkeypatch):
        import hf_sdft.jobs.recover as job

        def crash(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(job, "write_card", crash)
        with pytest.raises(OSError, match="disk full"):
            recover(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2")
        left = sorted(p.name for p in tmp_path.iterdir())
        # no model, stats or card; the kept state stays until the outputs are in place
        assert left == ["best_state", "checkpoint-2", "run_fingerprint.json", "trainer_state.json"]
        assert not json.loads((tmp_path / "run_fingerprint.json").read_text())["complete"]
        monkeypatch.undo()
        stats, _ = recover(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2")  # resumes, saves
        assert stats["recovery"]["steps"] == 2 and (tmp_path / "README.md").is_file()
        assert not (tmp_path / "best_state").exists()

    @pytest.mark.parametrize("where", ["file", "under_a_file"])
    def test_output_dir_is_checked_before_loading(self, tiny, tmp_path, monkeypatch, where):
        (tmp_path / "taken").write_text("mine")
        out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "sub"
        no_loading(monkeypatch)
        with pytest.raises(NotADirectoryError, match="is an existing file, not a folder|is a file, not a folder"):
            recover(tiny, out)
        assert (tmp_path / "taken").read_text() == "mine"


class TestModelFlags:
    """Issue 26.6: every ModelConfig flag is honoured or refused."""

    @pytest.mark.parametrize("flags,msg", [
        (["--load_in_4bit", "true"], "load_in_4bit / load_in_8bit"),
        (["--load_in_8bit", "true"], "load_in_4bit / load_in_8bit"),
        (["--dtype", "bfloat16"], "dtype='bfloat16' is not used.*--teacher_dtype"),
        (["--model_revision", "v1.0"], "model_revision='v1.0' names a Hub revision but .* is a local folder"),
    ])
    def test_refused_before_loading(self, tiny, tmp_path, monkeypatch, flags, msg):
        import hf_sdft.jobs.recover as job

        monkeypatch.setattr(job, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
        with pytest.raises(ValueError, match=msg):
            recover(tiny, tmp_path, *flags)

    def test_revision_reaches_the_hub_download(self, monkeypatch):
        import huggingface_hub

        from hf_sdft.modeling import model_folder

        asked = {}

        def snapshot_download(repo_id, revision=None):
            asked.update(repo_id=repo_id, revision=revision)
            return f"/cache/models--{repo_id}/snapshots/0123abcd"

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        assert model_folder("org/teacher", revision="v1.0").name == "0123abcd"
        assert asked == {"repo_id": "org/teacher", "revision": "v1.0"}

    def test_attention_and_precisions_used_are_recorded(self, tiny, tmp_path, monkeypatch):
        import hf_sdft.jobs.recover as job

        loaded = []
        real = job.from_pretrained
        monkeypatch.setattr(job, "from_pretrained", lambda *a, **k: loaded.append(k) or real(*a, **k))
        stats, _ = recover(tiny, tmp_path, "--max_steps", "1", "--attn_implementation", "eager", "--bf16", "true")
        assert [k.get("attn_implementation") for k in loaded] == ["eager"]
        record = json.loads((tmp_path / STATS_FILE).read_text())["model"]
        assert record["attn_implementation"] == "eager" and record["revision"] is None
        assert record["precision"] == {"requested": "bf16", "used": "fp32", "student_weights": "float32",
                                       "teacher_measured": "float32", "teacher_after_training": "float32",
                                       "device": "cpu"}
        card = (tmp_path / "README.md").read_text()
        assert "| precision | fp32 mixed precision (bf16 asked for, not supported here)" in card
        assert "| attention | eager |" in card


class TestValidation:
    """Issue 26.7: bad options and files named before anything is loaded."""

    @pytest.mark.parametrize("flags,msg", [
        (["--quant_group_size", "0"], "quant_group_size='0': give a positive number"),
        (["--quant_group_size", "abc"], "quant_group_size='abc': give a positive number"),
        (["--quant_weights", "int3"], "quant_weights=.*int3|unsupported weight bit width 'int3'"),
        (["--degradation", "prune", "--prune_pattern", "3:8:1"], "unsupported pattern '3:8:1'"),
        (["--degradation", "prune", "--prune_method", "random"], "unsupported method 'random'"),
    ])
    def test_degradation_options_checked_when_parsed(self, flags, msg):
        with pytest.raises(ValueError, match=msg):
            _recipe_parser().parse_args_and_config(flags)

    def test_non_utf8_txt_names_the_file_and_offset(self, tiny, tmp_path):
        bad = tmp_path / "latin1.txt"
        bad.write_bytes("in the beginning god created the heaven ".encode() + "caf\xe9".encode("latin-1"))
        with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text: the byte at offset 43 \(0xe9\)"):
            recover(tiny, tmp_path / "out", "--train_file", str(bad))

    def test_empty_text_field_names_the_file(self, tiny, tmp_path, monkeypatch):
        empty = tmp_path / "empty.jsonl"
        empty.write_text('{"text": ""}\n{"text": "   "}\n')
        with pytest.raises(ValueError, match=r"train_file=.*empty\.jsonl: the field 'text' is empty in every row"):
            recover(tiny, tmp_path / "out", "--train_file", str(empty))
