"""README's promises: the snippet runs and recovers, the main command runs on the embedded
default with no data arguments, and CI runs README's exact test command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sdft.data import default_data_file, default_model_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker: str, lang: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n```{lang}\n(.*?)```", README, re.S)
    assert m, f"README has no {lang} block after <!-- {marker} -->"
    return m.group(1)


def test_two_commands():
    assert block_after("main-command", "bash").strip().endswith("hf-sdft recover")
    test_cmd = block_after("test-command", "bash").strip()
    assert test_cmd.startswith("pip install torch==2.13.0 && ")
    assert "test-command" in (ROOT / ".ci" / "run").read_text()  # CI extracts and runs this very line


def test_embedded_default_ships_model_and_text():
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (Path(default_model_path()) / f).exists()
    size = sum(p.stat().st_size for p in Path(default_model_path()).iterdir())
    assert size <= 15 * 2**20
    for split in ("train", "eval", "narrow_train", "narrow_eval", "chat_train", "chat_eval", "narrow_chat_train",
                  "narrow_chat_eval"):
        assert Path(default_data_file(split)).stat().st_size > 10_000


@pytest.mark.slow
def test_readme_snippet_recovers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block_after("readme-snippet", "python"), scope)
    means = [h["mean"] for h in scope["cka_history"](scope["trainer"].state.log_history)]
    kd = [e["kd_loss"] for e in scope["trainer"].state.log_history if "kd_loss" in e]
    assert means[-1] > means[0] and kd[-1] < kd[0]


@pytest.mark.slow
def test_main_command_on_the_embedded_default(tmp_path):
    """`hf-sdft recover` with no data arguments (a short budget here)."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sdft.cli", "recover", "--output_dir", str(tmp_path), "--max_steps", "20",
         "--cka_every_n_steps", "10", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "recovered perplexity" in proc.stdout and "recovery ratio R" in proc.stdout
    stats = json.loads((tmp_path / "sdft_stats.json").read_text())
    p = stats["perplexity"]
    assert p["degraded"] > 1.5 * p["teacher"]  # int2 in groups of 32 is a real degradation of the default model
    assert p["recovered"] < p["degraded"]
    assert stats["degradation"]["weights"] == "int2" and stats["degradation"]["group_size"] == "32"


@pytest.mark.slow
def test_study_command_from_readme(tmp_path):
    """README's `hf-sdft study` line on the embedded default, with a shorter budget appended."""
    line = block_after("study-command", "bash").strip()
    assert line.startswith("hf-sdft study ")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sdft.cli", *line.split()[1:], "--max_steps", "6", "--measure_points", "2",
         "--bootstrap_resamples", "100", "--disable_tqdm", "true", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "study" / "study.json").read_text())
    assert {p["arm"] for p in result["points"]} == {"degraded", "ce", "kd", "kd+cka", "cka", "head-kd"}
    assert {p["seed"] for p in result["points"] if p["seed"] is not None} == {0, 1}
    assert "head-kd recovered" in proc.stdout and (tmp_path / "study" / "study.md").exists()
