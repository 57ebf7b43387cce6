"""The recovery job's output folder, made trustworthy: the run's fingerprint (the settings that shape
the result) stored in the folder and in each checkpoint, so that a run resumes only its own
checkpoints and refuses another run's folder (:func:`prepare_output_dir`); final outputs written to
a staging folder and moved into place, replacing every file of the previous output (:func:`staged_outputs`);
JSON written through a temporary file and a rename (:func:`write_json`).

Rules (README "Reliability"):

- a folder holding no run output: the run starts there and writes ``run_fingerprint.json`` first;
- the same fingerprint, not complete: training resumes from the newest checkpoint of that fingerprint;
- the same fingerprint, complete: nothing is trained nor written, the saved stats are returned;
- another fingerprint (or outputs without one): refused, naming the differing settings, unless
  ``overwrite_output_dir`` (its checkpoints and outputs are deleted first) or an explicit
  ``resume_from_checkpoint`` (a warning names the differences).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging

from hf_sdft.data import default_model_path
from hf_sdft.jobs.cards import STATS_FILE

logger = logging.get_logger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# what a finished run leaves at the top of output_dir (besides checkpoints): replaced as a whole by
# the next save, so that no file of an earlier format (a stale quanto_qmap.json, adapter_config.json,
# a shard index) stays beside the new one
MODEL_OUTPUTS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "quanto_qmap.json", "quanto_group_sizes.json", "adapter_config.json", "adapter_model.*",
    "quantized_base",
)
TOKENIZER_OUTPUTS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
RUN_OUTPUTS = ("README.md", STATS_FILE, "cka_per_layer.png", "cka_history.png", "loss_curves.png",
               "compressed-tensors", "gguf", "dense")
FINAL_OUTPUTS = MODEL_OUTPUTS + TOKENIZER_OUTPUTS + RUN_OUTPUTS
# deleted with the checkpoints by overwrite_output_dir (intermediate stages, logs, the rewritten narrow task)
RUN_STATE = ("trainer_state.json", FINGERPRINT_FILE, "forgetting-sft", "prevent", "runs", "narrow_rewritten.jsonl")

# settings that do not change the trained model nor its figures (how it is logged, saved, exported or pushed)
TRAINING_FIELDS = (  # transformers.TrainingArguments fields that shape the result
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "max_steps",
    "num_train_epochs", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
    "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
    "label_smoothing_factor", "neftune_noise_alpha", "full_determinism",
)
SDFT_SKIPPED = ("teacher_device", "use_kernels", "kd_chunk_size", "kd_chunk_memory_mb", "kd_fused", "kd_kernel",
                "quant_reuse_grid", "quant_compile")  # how, not what
JOB_SKIPPED = ("eval_tasks", "eval_limit", "eval_batch_size", "export_formats", "export_allow_rounding", "hub_format",
               "overwrite_output_dir")
DATA_FILES = ("train_file", "eval_file", "narrow_train_file", "narrow_eval_file")


def write_json(path: str | Path, obj) -> None:
    """``obj`` as JSON at ``path`` through a temporary file in the same folder and a rename: a
    crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_signature(name_or_path: str | None) -> dict | str | None:
    """What identifies a model cheaply: a Hub id as given; a local folder by its config's hash and
    its weight files' names and sizes (the embedded default model for None)."""
    if name_or_path is None:
        name_or_path = default_model_path()
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    config = folder / "config.json"
    weights = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                     if p.is_file() and p.suffix in (".safetensors", ".bin", ".json") and p.name != "README.md")
    return {"name": folder.name, "config": file_digest(config) if config.is_file() else None,
            "files": [f"{name}:{size}" for name, size in weights]}


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(getattr(value, "value", value))


def run_settings(rec, args, model_args) -> dict:
    """``{setting: value}`` of everything that shapes the result: the job's fields (data files by
    content), the training schedule and loss, the model fields; logging, output paths, exports,
    the Hub and implementation choices are left out."""
    settings = {}
    for f in dataclasses.fields(rec):
        if f.name in JOB_SKIPPED:
            continue
        value = getattr(rec, f.name)
        if f.name in DATA_FILES and value is not None:
            value = {"name": Path(value).name, "sha256": file_digest(value)}
        elif f.name in ("student_name_or_path", "teacher_cache") and value is not None:
            value = model_signature(value)
        settings[f.name] = _plain(value)
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(args):
        own = f.name not in base and f.name not in SDFT_SKIPPED and not f.name.startswith("vllm_")
        if f.name in TRAINING_FIELDS or own:
            settings[f.name] = _plain(getattr(args, f.name))
    for f in dataclasses.fields(model_args):
        settings[f.name] = _plain(getattr(model_args, f.name))
    settings["model_name_or_path"] = model_signature(model_args.model_name_or_path)
    return settings


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_fingerprint(folder: str | Path) -> dict | None:
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"fingerprint": None, "settings": {}}


def differences(old: dict, new: dict) -> list[str]:
    """``name (old → new)`` for each setting that differs."""
    names = sorted(set(old) | set(new))
    return [f"{n} ({_brief(old.get(n, '<unset>'))} → {_brief(new.get(n, '<unset>'))})"
            for n in names if old.get(n, "<unset>") != new.get(n, "<unset>")]


def _brief(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: -int(p.name.split("-")[1]))


def _entries(folder: Path, patterns) -> list[Path]:
    return [p for p in folder.iterdir() if any(fnmatch(p.name, pat) for pat in patterns)]


def remove_entries(folder: Path, patterns, keep: Path | None = None) -> None:
    """Delete ``folder``'s entries whose names match ``patterns`` (but ``keep``)."""
    for path in _entries(folder, patterns):
        if keep is None or path.resolve() != Path(keep).resolve():
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output_dir(output_dir: str | None) -> Path:
    """``output_dir`` as a folder this process can write into (created when missing), checked before
    any model is loaded: an existing file or an unwritable folder is a clear error, not a failure
    after training."""
    if not output_dir:
        raise ValueError("output_dir is empty: give the folder to write the recovered model to (--output_dir)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir={output_dir} is an existing file, not a folder: give a folder path "
                                 "(it is created when missing)")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"output_dir={output_dir}: {blocker} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"output_dir={output_dir} is not writable ({err.strerror or err}): fix its permissions "
                              "or choose another --output_dir (checked before training, so no work is lost)") from None
    return out


@dataclasses.dataclass
class RunFolder:
    """What :func:`prepare_output_dir` decided: the fingerprint, and the saved stats when the run is already complete."""

    path: Path
    fingerprint: str
    settings: dict
    complete_stats: dict | None = None

    def record(self, complete: bool = False) -> None:
        write_json(self.path / FINGERPRINT_FILE,
                   {"fingerprint": self.fingerprint, "complete": complete, "settings": self.settings})


def prepare_output_dir(rec, args, model_args, *, write: bool = True) -> RunFolder:
    """Check ``args.output_dir`` against this run before anything is loaded (see the module's rules);
    ``write``: this process writes (the main one)."""
    out = check_output_dir(args.output_dir)
    settings = run_settings(rec, args, model_args)
    run = RunFolder(out, fingerprint(settings), settings)
    stored = read_fingerprint(out)
    held = checkpoints(out) or _entries(out, (STATS_FILE, *MODEL_OUTPUTS))
    overwrite = bool(getattr(rec, "overwrite_output_dir", False))
    explicit = args.resume_from_checkpoint is not None
    if stored is not None and stored.get("fingerprint") == run.fingerprint:
        if stored.get("complete") and (out / STATS_FILE).is_file() and not overwrite and not explicit:
            logger.warning(f"{out} already holds this run, complete: nothing to train (--overwrite_output_dir true "
                           "runs it again from the start)")
            run.complete_stats = json.loads((out / STATS_FILE).read_text())
            return run
    elif (stored is not None or held) and not overwrite:
        what = ("another run's output: settings differ: " + "; ".join(differences(stored.get("settings", {}), settings))
                if stored is not None else
                f"a run's output without a fingerprint ({', '.join(sorted(p.name for p in held)[:4])})")
        if explicit:
            logger.warning(f"output_dir {out} holds {what}. Resuming from {args.resume_from_checkpoint} as asked")
        else:
            raise FileExistsError(
                f"output_dir {out} holds {what}. Resuming it would train the other run's checkpoint: give another "
                "--output_dir, or --overwrite_output_dir true to delete its checkpoints and outputs")
    if overwrite and write:
        clear_output_dir(out)
    if write:
        run.record(complete=False)
    return run


def clear_output_dir(out: Path) -> None:
    """Delete a previous run's checkpoints, outputs and state from ``out`` (other files are kept)."""
    for path in checkpoints(out) + _entries(out, FINAL_OUTPUTS + RUN_STATE):
        _remove(path)


def matching_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` of ``output_dir`` saved by the run whose fingerprint the folder
    holds (None when there is none): a checkpoint of another run is never resumed."""
    out = Path(output_dir)
    stored = read_fingerprint(out)
    if stored is None:
        return None
    for checkpoint in checkpoints(out):
        saved = read_fingerprint(checkpoint)
        if saved is not None and saved.get("fingerprint") == stored.get("fingerprint"):
            return str(checkpoint)
        logger.warning(f"{checkpoint} was not saved by this run (its {FINGERPRINT_FILE} differs or is missing): "
                       "not resumed")
    return None


class FingerprintCallback(TrainerCallback):
    """Copies the run's fingerprint into each checkpoint as it is saved."""

    def __init__(self, output_dir: str | Path):
        self.source = Path(output_dir) / FINGERPRINT_FILE

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir() and self.source.is_file():
            write_json(folder / FINGERPRINT_FILE, json.loads(self.source.read_text()))


@contextlib.contextmanager
def staged_outputs(output_dir: str | Path):
    """A staging folder inside ``output_dir`` to write the final model, stats and card into; on
    success the previous final outputs (:data:`FINAL_OUTPUTS`, every format's files) are set aside,
    the staged ones moved into place and the old ones deleted. On an error nothing of the new
    output is left in ``output_dir``."""
    out = Path(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=".sdft-staging-", dir=out))
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Replace ``out``'s final outputs by ``staging``'s entries (renames within one file system);
    should a rename fail, the previous outputs are put back."""
    old = Path(tempfile.mkdtemp(prefix=".sdft-previous-", dir=out))
    moved: list[Path] = []
    try:
        for path in _entries(out, FINAL_OUTPUTS) + [out / p.name for p in staging.iterdir()]:
            if path.exists() and not (old / path.name).exists():
                os.replace(path, old / path.name)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
            moved.append(out / path.name)
    except BaseException:
        for path in moved:
            _remove(path)
        for path in old.iterdir():
            os.replace(path, out / path.name)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
