"""Model cards and plots from a real (tiny) recovery output folder; upload planning; no network."""

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from matplotlib.image import imread
from trl import ModelConfig

from hf_sdft.cli import main
from hf_sdft.compress.quantize import load_quantized
from hf_sdft.data import as_batches, load_texts, pack_blocks
from hf_sdft.jobs import cards
from hf_sdft.jobs.cards import STATS_FILE, build_card, push_recovered, upload_plan, write_card
from hf_sdft.jobs.config import RecoveryArguments, RecoveryConfig
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.jobs.plots import PIXELS
from hf_sdft.jobs.recover import run_recovery
from tests.helpers import make_texts, make_tokenizer, write_tiny_inputs

IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real recovery (int4, 6 steps) with its card written: (output folder, stats)."""
    root = write_tiny_inputs(tmp_path_factory.mktemp("card"), 200, 60)
    rec = RecoveryArguments(train_file=str(root / "train.txt"), eval_file=str(root / "eval.txt"), block_size=32,
                            cka_every_n_steps=2, probe_blocks=8, calibration_blocks=4, quant_weights="int4",
                            quant_group_size="channel")
    args = RecoveryConfig(output_dir=str(root / "out"), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                          warmup_steps=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    stats = run_recovery(rec, args, ModelConfig(model_name_or_path=str(root / "model")))
    write_card(root / "out")
    return root / "out", stats


def variant(run, tmp_path, **changes):
    """A copy of the run's stats (only) with ``changes``, in a fresh folder."""
    stats = {**json.loads((run[0] / STATS_FILE).read_text()), **changes}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / STATS_FILE).write_text(json.dumps(stats))
    return tmp_path


def test_metadata_parses_with_the_stats_perplexities(run):
    out, stats = run
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in data  # a local folder is not a Hub id
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"hf-sdft", "quanto", "int4"} <= set(data["tags"])
    [entry] = data["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["name"] == "eval.txt (local file)"
    values = {m["name"]: m["value"] for m in result["metrics"] if m["type"] == "perplexity"}
    assert values == {f"perplexity ({k})": v for k, v in stats["perplexity"].items()}


def test_body_holds_the_real_numbers(run):
    out, stats = run
    text = (out / "README.md").read_text()
    ppl = stats["perplexity"]
    assert f"| teacher (original) | {ppl['teacher']:.3f} |" in text
    assert f"| degraded | {ppl['degraded']:.3f} | {stats['cka']['mean_before']:.4f} |" in text
    assert f"**{ppl['recovered']:.3f}**" in text
    for layer, before in stats["cka"]["before"].items():
        after = stats["cka"]["after"][layer]
        assert f"| {layer} | {before:.4f} | {after:.4f} | {after - before:+.4f} |" in text
    assert "| weights | int4 |" in text and f"| steps | {stats['recovery']['steps']} |" in text
    assert "arXiv:2604.15794" in text and "arXiv:2606.05682" in text and "never by CKA alone" in text


def test_plots_are_images_of_the_fixed_size_and_all_linked(run):
    out, _ = run
    text = (out / "README.md").read_text()
    links = IMAGE_LINK.findall(text)
    assert links == ["cka_per_layer.png", "cka_history.png", "loss_curves.png"]
    for link in links:
        image = imread(out / link)
        assert image.shape[:2] == (PIXELS[1], PIXELS[0]) and image.std() > 0


def test_loading_code_in_the_card_loads_the_recovered_student(run):
    out, stats = run
    text = (out / "README.md").read_text()
    code = re.search(r"## How to load.*?```python\n(.*?)```", text, re.S)[1]
    assert code.strip() == stats["loading_code"].replace("{path}", out.as_posix())
    scope = {}
    exec(code, scope)
    ids = torch.tensor([make_tokenizer()(make_texts(1, seed=9)[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(scope["model"](input_ids=ids).logits, load_quantized(out)(input_ids=ids).logits)
    assert stats["data"]["eval_file"] == "eval.txt"  # by base name: the stats are uploaded
    blocks = pack_blocks(make_tokenizer(), load_texts(data_file=str(out.parent / "eval.txt")), 32, 200)
    recovered = stats["perplexity"]["recovered"]
    assert perplexity(scope["model"], as_batches(blocks, 16)) == pytest.approx(recovered, rel=1e-4)


def test_repo_id_goes_into_the_loading_code(run, tmp_path, capsys):
    folder = variant(run, tmp_path)
    main(["card", str(folder), "--repo_id", "someone/tiny-int4-sdft"])
    path = folder / "README.md"
    text = path.read_text()
    assert 'load_quantized("someone/tiny-int4-sdft")' in text and str(folder) not in text
    assert ModelCard.load(path).data.to_dict()["model-index"][0]["name"] == "tiny-int4-sdft"
    assert "wrote" in capsys.readouterr().out


def test_hub_base_and_license_of_a_local_base(run, tmp_path):
    hub = build_card(variant(run, tmp_path / "hub", base_model="org/base-1b", base_model_local=False)).data.to_dict()
    assert hub["base_model"] == "org/base-1b" and hub["base_model_relation"] == "quantized" and "license" not in hub
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    local = build_card(variant(run, tmp_path / "local", base_model=str(base))).data.to_dict()
    assert local["license"] == "mit" and "base_model" not in local


def test_run_without_cka_history_has_no_heatmap(run, tmp_path):
    folder = variant(run, tmp_path, cka_history=[])
    (folder / "cka_history.png").write_bytes(b"stale")
    text = write_card(folder).read_text()
    assert IMAGE_LINK.findall(text) == ["cka_per_layer.png"]  # no trainer_state.json either: no loss curves
    assert not (folder / "cka_history.png").exists()
    ModelCard.load(folder / "README.md")


def test_run_without_cka_at_all_has_no_cka_table_nor_plots(run, tmp_path):
    stats = json.loads((run[0] / STATS_FILE).read_text())
    folder = variant(run, tmp_path, cka_history=[], cka={**stats["cka"], "before": {}, "after": {}})
    text = write_card(folder).read_text()
    assert "Per-layer CKA" not in text and "### Plots" not in text and not IMAGE_LINK.findall(text)
    assert not list(folder.glob("*.png"))


def test_pruned_lora_narrow_task_fields(run, tmp_path):
    folder = variant(
        run, tmp_path, tags=["pruned", "2:4", "wanda"], recovery_ratio=0.8125, format="quanto+lora",
        degradation={"kind": "prune", "sparsity": 0.5, "pattern": "2:4", "method": "wanda", "measured_sparsity": 0.5},
        narrow_perplexity={"teacher": 40.0, "degraded": 3.0, "recovered": 3.25},
    )
    card = ModelCard.load(write_card(folder))
    data = card.data.to_dict()
    assert data["tags"][-3:] == ["pruned", "2:4", "wanda"] and data["library_name"] == "peft"
    narrow = data["model-index"][0]["results"][1]["metrics"]
    assert [m["value"] for m in narrow] == [40.0, 3.0, 3.25]
    assert "R = 0.812" in card.text and "narrow-task perplexity |" in card.text
    assert "| sparsity pattern | 2:4 |" in card.text


def test_missing_stats_says_how_to_produce_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sdft_stats\.json is missing.*hf-sdft recover"):
        write_card(tmp_path)


def test_upload_plan_is_an_allow_list(run, tmp_path):
    out, _ = run
    plan = upload_plan(out)
    assert any((out / p).parent.name.startswith("checkpoint-") for p in out.glob("checkpoint-*/*"))
    top = {p.name for p in out.iterdir() if p.is_file()}
    assert set(plan) == top - {"trainer_state.json", "run_fingerprint.json"}  # no checkpoint, no run state
    assert {"README.md", STATS_FILE, "model.safetensors", "quanto_qmap.json", "cka_history.png",
            "tokenizer.json"} <= set(plan)
    folder = tmp_path / "f"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.pth", "*.bin"))
    never = ("teacher/config.json", "runs/events.out", ".git/HEAD", "teacher_cache/data-00000-of-00001.arrow",
             "narrow_rewritten.jsonl", "train.jsonl", "old_model.bin", "trainer_state.json", "run_fingerprint.json",
             "notes.txt", "stale/model.safetensors", "gguf/.cache/x")
    for extra in (*never, "quantized_base/quanto_qmap.json", "gguf/model.gguf", "compressed-tensors/config.json",
                  "dense/model.safetensors"):
        (folder / extra).parent.mkdir(parents=True, exist_ok=True)
        (folder / extra).write_text("{}")
    expected = {p for p in plan if not p.endswith(".safetensors")} | {
        "quantized_base/quanto_qmap.json", "gguf/model.gguf", "compressed-tensors/config.json", "dense/model.safetensors"}
    assert set(upload_plan(folder)) == expected


def test_push_uploads_the_plan(run, tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

        def create_commit(self, *, repo_id, operations, commit_message):
            calls["upload"] = (repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations})

    monkeypatch.setattr(cards, "HfApi", FakeApi)
    folder = variant(run, tmp_path)
    (folder / "train_rewritten.jsonl").write_text("{}")  # left there by someone: never uploaded
    push_recovered(folder, "tiny", private=True, token="t")  # namespace from the token's user
    assert calls["create"] == ("tiny", True, True) and calls["token"] == "t"
    repo, files = calls["upload"]
    assert repo == "me/tiny" and set(files) == set(upload_plan(folder)) and "train_rewritten.jsonl" not in files
    assert files["README.md"] == str(folder / "README.md")
    text = (folder / "README.md").read_text()
    assert 'load_quantized("me/tiny")' in text and "This repository is **private**" in text
    push_recovered(folder, "tiny", private=False, token="t")
    assert "This repository is **public**" in (folder / "README.md").read_text()


def test_stats_hold_no_local_paths(run):
    out, _ = run
    text = (out / STATS_FILE).read_text()
    assert str(out.parent) not in text and "/tmp" not in text
    stats = json.loads(text)
    assert stats["base_model"] == "model" and stats["data"] == {"train_file": "train.txt", "eval_file": "eval.txt",
                                                                "dataset_train_split": "train",
                                                                "dataset_test_split": "validation"}
