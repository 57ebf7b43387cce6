"""Model cards for recovery outputs: plots and a README.md with Hub metadata, built from
``sdft_stats.json`` (written by ``hf-sdft recover``); and the upload of the folder.

    hf-sdft card OUTPUT_DIR [--repo_id user/name]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_sdft.data import default_model_path
from hf_sdft.jobs import plots

STATS_FILE = "sdft_stats.json"
PLOT_NAMES = ("cka_per_layer", "cka_history", "loss_curves")
# the only files pushed (native format): the model, its tokenizer, the card, plots and stats at the
# root, and the quantized base / exported formats in their subfolders; nothing else a run or a user
# left in the folder (checkpoints, training data, a teacher cache, logs) is ever uploaded
UPLOAD_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "quanto_qmap.json", "quanto_group_sizes.json", "adapter_config.json",
    "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "README.md", STATS_FILE, *(f"{name}.png" for name in PLOT_NAMES),
)
UPLOAD_FOLDERS = ("quantized_base", "compressed-tensors", "gguf", "dense")  # their files, any depth
DEGRADATION_LABELS = {
    "weights": "weights", "activations": "activations", "group_size": "group size",
    "quantized_layers": "quantized layers", "exclude": "kept in float", "sparsity": "target sparsity",
    "pattern": "sparsity pattern", "method": "pruning score", "measured_sparsity": "measured sparsity",
    "mode": "mode", "sft_steps": "narrow-task SFT steps", "sft_learning_rate": "narrow-task SFT learning rate",
    "student": "student checkpoint", "quantization": "quantization", "adapters": "adapters",
    "total": "measured sparsity", "layers": "pruned layers", "kept": "zeros kept exactly",
    "clip_search": "clipping search", "clip_groups_shrunk": "fraction of groups clipped",
    "clip_mean_ratio": "mean clipping ratio", "learned_scales": "scales and shifts learned in QAT",
}


@dataclass
class CardArguments:
    """``hf-sdft card`` options."""

    output_dir: str = field(metadata={"help": f"Folder written by hf-sdft recover (holds {STATS_FILE}); may also be "
                                      "given bare, as the first argument."})
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo the folder will be pushed to (used in the loading code)."})


def degradation_rows(degradation: dict) -> list[tuple[str, str]]:
    """(label, value) rows of ``sdft_stats.json``'s degradation; what was detected in your own
    student (sparsity, quantization, adapters) is spelled out one level down."""
    rows = []
    for key, value in degradation.items():
        if key == "kind":
            continue
        if key == "layers" and isinstance(value, dict):
            rows.append((DEGRADATION_LABELS[key], str(len(value))))
        elif isinstance(value, dict):
            rows += [(f"{key}: {label}", text) for label, text in degradation_rows(value)]
        else:
            rows.append((DEGRADATION_LABELS.get(key, key), _show(value)))
    return rows


def template_path() -> Path:
    return Path(str(resources.files("hf_sdft.model_cards") / "template.md"))


def load_stats(output_dir: str | Path) -> dict:
    """``output_dir/sdft_stats.json``, or a FileNotFoundError saying how to produce it."""
    path = Path(output_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a model card is built from the statistics of a recovery run. "
            f"Run `hf-sdft recover --output_dir {output_dir} ...` (or hf_sdft.jobs.recover.run_recovery) first."
        )
    return json.loads(path.read_text())


def load_log_history(output_dir: str | Path) -> list[dict]:
    """The Trainer log history: ``output_dir/trainer_state.json``, else the newest checkpoint's."""
    output_dir = Path(output_dir)
    states = [output_dir / "trainer_state.json"]
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    states += [p / "trainer_state.json" for p in sorted(checkpoints, key=lambda p: -int(p.name.split("-")[1]))]
    for state in states:
        if state.is_file():
            return json.loads(state.read_text()).get("log_history", [])
    return []


def write_plots(output_dir: str | Path, stats: dict | None = None) -> dict[str, Path | None]:
    """Draw the run's PNGs into ``output_dir``; a plot without data is skipped (and a stale
    file of that name removed). Returns ``{name: path or None}``."""
    output_dir = Path(output_dir)
    stats = load_stats(output_dir) if stats is None else stats
    written = {
        "cka_per_layer": plots.plot_cka_per_layer(stats["cka"]["before"], stats["cka"]["after"], output_dir),
        "cka_history": plots.plot_cka_history(stats.get("cka_history", []), output_dir),
        "loss_curves": plots.plot_loss_curves(load_log_history(output_dir), output_dir),
    }
    for name, path in written.items():
        if path is None:
            (output_dir / f"{name}.png").unlink(missing_ok=True)
    return written


def _hub_id(name: str) -> str | None:
    """``name`` if it is a Hub repo id rather than a local folder."""
    if Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _local_name(base: str, default: bool | None = None) -> str:
    same = default if default is not None else Path(base).resolve() == Path(default_model_path()).resolve()
    return "the hf-sdft embedded default model" if same else f"a local model (`{Path(base).name}`)"


def _local_license(base: str) -> str | None:
    readme = Path(base) / "README.md"
    return (metadata_load(readme) or {}).get("license") if readme.is_file() else None


def _eval_source(data: dict, prefix: str) -> dict:
    """EvalResult dataset fields for the eval text (``prefix`` "" or "narrow_"); local text
    gets the split name ``eval`` / ``narrow_eval`` so the two never merge in the model-index."""
    file, hub = data.get(f"{prefix}eval_file"), data.get(f"{prefix}dataset_name")
    if hub and not file:  # as hf_sdft.data.load_recovery_data reads it: the test split, one config name for both
        return {"dataset_type": hub, "dataset_name": hub, "dataset_config": data.get("dataset_config_name"),
                "dataset_split": data.get("dataset_test_split", "validation")}
    name = f"{Path(file).name} (local file)" if file else f"hf-sdft default {prefix}eval text"
    return {"dataset_type": "text", "dataset_name": name, "dataset_split": f"{prefix}eval"}


def _eval_results(stats: dict) -> list[EvalResult]:
    out = []
    for key, prefix in (("perplexity", ""), ("narrow_perplexity", "narrow_")):
        for model, value in stats.get(key, {}).items():
            out.append(EvalResult(task_type="text-generation", metric_type="perplexity", metric_value=value,
                                  metric_name=f"{'narrow-task ' if prefix else ''}perplexity ({model})",
                                  **_eval_source(stats["data"], prefix)))
    for model, tasks in stats.get("downstream", {}).items():  # lm-evaluation-harness scores
        out += [EvalResult(task_type="text-generation", metric_type=metric, metric_value=value,
                           metric_name=f"{task} {metric} ({model})", dataset_type=task, dataset_name=task)
                for task, metrics in tasks.items() for metric, value in metrics.items() if "stderr" not in metric]
    return out


def _show(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def _linked_plots(output_dir: Path) -> dict[str, str]:
    return {name: f"{name}.png" for name in PLOT_NAMES if (output_dir / f"{name}.png").is_file()}


def export_sections(stats: dict, load_path: str, hub_format: str | None) -> list[dict]:
    """Per exported format: where it is (the repository's root for ``hub_format``, else its
    subfolder), its grid, size and measured perplexity, and the lines that load or serve it (the
    same lines for a local folder and a Hub repo: ``subfolder=`` / ``gguf_file=`` reach inside)."""
    hub = _hub_id(load_path) is not None
    sections = []
    for fmt, info in stats.get("exports", {}).items():
        sub = None if fmt == hub_format else info["path"]
        path = f"{load_path}/{sub}" if sub else load_path
        download = hub and sub is not None  # engines take a Hub id for the root only: fetch a subfolder first
        local = sub if download else path
        fetch = [f"huggingface-cli download {load_path} --include '{sub}/*' --local-dir ."] if download else []
        if fmt == "gguf":
            gguf = f"{sub}/model.gguf" if sub else "model.gguf"
            python = (f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                      f'"{load_path}", gguf_file="{gguf}")')
            if hub and sub is None:
                fetch, local = [f"huggingface-cli download {load_path} model.gguf Modelfile --local-dir ."], "."
            shell = fetch + [f'llama-cli -m {local}/model.gguf -p "In the beginning" -n 40',
                             f"ollama create {Path(load_path).name.lower()} -f {local}/Modelfile"]
        else:
            where = f', subfolder="{sub}"' if sub else ""
            python = (f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                      f'"{load_path}"{where})')
            shell = fetch + [f"vllm serve {local}", f"python -m sglang.launch_server --model-path {local}"] \
                if fmt == "compressed-tensors" else []
        sections.append({"format": fmt, "path": path, "python": python, "shell": shell, **info})
    return sections


def build_card(output_dir: str | Path, repo_id: str | None = None, hub_format: str | None = None,
               shown_as: str | Path | None = None, private: bool | None = None) -> ModelCard:
    """The model card of a recovery output folder (links the plots already in it).

    ``repo_id``: the Hub repo the folder goes to; the loading code then uses it instead of
    the folder path. ``hub_format``: the exported format that sits at the repository's root
    (None: the folder as saved). ``shown_as``: the folder the card will sit in when it is written
    elsewhere first (the job's staging folder), named in the loading code. ``private``: the Hub
    repository's visibility, said in the card (None: not pushed).
    """
    output_dir = Path(output_dir)
    shown = Path(shown_as) if shown_as is not None else output_dir
    stats = load_stats(output_dir)
    base = stats["base_model"]
    hub_base = None if stats.get("base_model_local") else _hub_id(base)
    lora_adapters = "lora" in stats["format"]
    relation = "adapter" if lora_adapters else "quantized" if stats["degradation"]["kind"] == "quanto" else "finetune"
    model_name = (repo_id or shown.resolve().name).split("/")[-1]
    datasets = [stats["data"][k] for k in ("dataset_name", "narrow_dataset_name") if stats["data"].get(k)]
    card_data = ModelCardData(
        base_model=hub_base, base_model_relation=relation if hub_base else None,
        library_name="peft" if lora_adapters else "transformers", pipeline_tag="text-generation",
        license=stats.get("base_model_license") or _local_license(base) if hub_base is None else None,
        tags=["hf-sdft", "sdft", *stats["tags"]], datasets=datasets or None,
        model_name=model_name, eval_results=_eval_results(stats),
    )
    load_path = repo_id or shown.as_posix()
    cka_before, cka_after = stats["cka"]["before"], stats["cka"]["after"]
    exports = export_sections(stats, load_path, hub_format)
    loading_code = stats["loading_code"].replace("{path}", load_path)
    if hub_format in stats.get("exports", {}):
        loading_code = next(e["python"] for e in exports if e["format"] == hub_format)
    return ModelCard.from_template(
        card_data, template_path=str(template_path()),
        model_name=model_name, stats=stats, hub_base=hub_base,
        base_name=hub_base or _local_name(base, stats.get("base_model_default")), private=private,
        degradation_rows=degradation_rows(stats["degradation"]),
        cka_rows=[(int(k), cka_before[k], cka_after.get(k)) for k in sorted(cka_before, key=int)],
        eval_name=_eval_source(stats["data"], "")["dataset_name"],
        plots=_linked_plots(output_dir),
        loading_code=loading_code, load_path=load_path, exports=exports,
    )


def write_card(output_dir: str | Path, repo_id: str | None = None, hub_format: str | None = None,
               shown_as: str | Path | None = None, private: bool | None = None) -> Path:
    """Draw the plots and write ``output_dir/README.md`` (through a temporary file and a rename);
    returns the README path."""
    output_dir = Path(output_dir)
    write_plots(output_dir)
    path = output_dir / "README.md"
    tmp = output_dir / ".README.md.tmp"
    build_card(output_dir, repo_id, hub_format, shown_as, private).save(tmp)
    os.replace(tmp, path)
    return path


def write_stats_card(output_dir: str | Path, repo_id: str | None = None) -> bool:
    """The recovery card (:func:`write_card`) when ``output_dir`` holds the recovery's stats; False
    (nothing written) otherwise. The trainers' ``model_card_writer`` in the recovery job."""
    if not (Path(output_dir) / STATS_FILE).exists():
        return False
    write_card(output_dir, repo_id)
    return True


def upload_plan(output_dir: str | Path) -> list[str]:
    """The files (relative POSIX paths) :func:`push_recovered` uploads in the native format: those
    of the allow-list (:data:`UPLOAD_FILES` at the root, :data:`UPLOAD_FOLDERS`' files), nothing else."""
    root = Path(output_dir)
    plan = [p.name for p in root.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in UPLOAD_FILES)]
    for folder in UPLOAD_FOLDERS:
        if (root / folder).is_dir():
            plan += [p.relative_to(root).as_posix() for p in (root / folder).rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(plan)


def hub_upload_plan(output_dir: str | Path, hub_format: str) -> dict[str, Path]:
    """``{path in the repository: local file}`` when an exported format goes to the root: that
    export's files, the card, plots and stats at the root, every other export in its subfolder."""
    root = Path(output_dir)
    exports = load_stats(root).get("exports", {})
    if hub_format not in exports:
        raise ValueError(f"hub_format {hub_format} was not exported to {root}: add it to export_formats")
    plan = {p.name: p for p in sorted((root / exports[hub_format]["path"]).iterdir()) if p.is_file()}
    plan |= {name: root / name for name in ("README.md", STATS_FILE, *(f"{n}.png" for n in PLOT_NAMES))
             if (root / name).is_file()}
    for fmt, info in exports.items():
        if fmt != hub_format:
            folder = root / info["path"]
            plan |= {f"{info['path']}/{p.name}": p for p in sorted(folder.iterdir()) if p.is_file()}
    return plan


def push_recovered(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                   hub_format: str | None = None):
    """Create the Hub repo if needed, write the card for it (saying whether the repository is
    private) and upload in one commit. With an exported ``hub_format``, :func:`hub_upload_plan`'s
    files (transformers, vLLM or llama.cpp load the repository as it is); else (None or ``native``)
    :func:`upload_plan`'s allow-list. ``repo_id`` may omit the
    namespace (the token's user). Returns the ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    exported = hub_format not in (None, "native")
    write_card(output_dir, repo_id, hub_format if exported else None, private=private)
    message = "Upload model recovered with hf-sdft"
    if exported:
        plan = hub_upload_plan(output_dir, hub_format)
    else:
        plan = {name: Path(output_dir) / name for name in upload_plan(output_dir)}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.items()]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=message)
