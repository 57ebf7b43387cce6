"""Release: a clean copy of the repository builds an sdist and, from it, a wheel that passes
``twine check``, ships every file of the package, and runs ``hf-sdft recover`` when installed
alone in a fresh virtual environment, away from the repository."""

import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hf_sdft

ROOT = Path(__file__).resolve().parents[1]
# what a clean checkout lacks (.gitignore's entries, the git folder)
NOT_IN_CHECKOUT = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "outputs", "runs")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def expected_wheel_files() -> set[str]:
    """Every file of the source package, as the wheel should name it."""
    files = set()
    for folder, prefix in ((ROOT / "hf_sdft", "hf_sdft"), (ROOT / "model_cards", "hf_sdft/model_cards")):
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.add(f"{prefix}/{path.relative_to(folder).as_posix()}")
    return files


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the release test needs `build` (pip install -e '.[test]')")
    pytest.importorskip("twine", reason="the release test needs `twine` (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_IN_CHECKOUT))
    # no flags: the sdist first, then the wheel from the sdist, which so proves the sdist complete;
    # no isolation: setuptools comes from this environment (the test extra), no download
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", src])
    return tmp / "dist"


@pytest.mark.slow
def test_sdist_and_wheel_pass_twine_check_and_ship_the_package(dist):
    [sdist] = dist.glob(f"hf_sdft-{hf_sdft.__version__}.tar.gz")
    [wheel] = dist.glob(f"hf_sdft-{hf_sdft.__version__}-py3-none-any.whl")
    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"hf_sdft-{hf_sdft.__version__}.dist-info/entry_points.txt").decode()
    for name in ("hf_sdft/trainer/sdft_trainer.py", "hf_sdft/jobs/recover.py", "hf_sdft/cka/callback.py",
                 "hf_sdft/compress/quantize.py", "hf_sdft/default_model/config.json",
                 "hf_sdft/default_model/model.safetensors", "hf_sdft/default_model/tokenizer.json",
                 "hf_sdft/default_data/train.jsonl", "hf_sdft/metrics/cka/cka.py",
                 "hf_sdft/eval_tasks/sdft_kjv_nextline.yaml", "hf_sdft/model_cards/template.md"):
        assert name in names
    assert not expected_wheel_files() - names  # a new subpackage or data file is shipped too
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "model_cards/"))]
    assert "hf-sdft = hf_sdft.cli:main" in entry_points

    top = f"hf_sdft-{hf_sdft.__version__}"
    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())
    for name in ("README.md", "CHANGELOG.md", "setup.cfg", "setup.py", "pyproject.toml", "model_cards/template.md"):
        assert f"{top}/{name}" in members


@pytest.mark.slow
def test_installed_wheel_runs_recover_outside_the_repository(dist, tmp_path):
    [wheel] = dist.glob("*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # the wheel alone, with pip from this environment; installed before the dependencies are made
    # visible, so pip never sees (or touches) this environment's editable hf-sdft
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    # the dependencies (torch, transformers, ...) from this environment, after the venv's own
    # packages; --system-site-packages would reach the base interpreter's, not this venv's
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    (Path(purelib) / "_running_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "TOKENIZERS_PARALLELISM": "false"}
    where = run([python, "-c", "import hf_sdft; print(hf_sdft.__file__)"], cwd=outside, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where

    out = tmp_path / "out"
    proc = run([venv / "bin" / "hf-sdft", "recover", "--output_dir", out, "--max_steps", "2",
                "--max_eval_blocks", "16", "--probe_blocks", "4", "--cka_every_n_steps", "2",
                "--save_strategy", "no", "--disable_tqdm", "true"], cwd=outside, env=env)
    assert "recovery ratio R" in proc.stdout and f"saved to {out}" in proc.stdout
    assert (out / "sdft_stats.json").is_file()
    assert (out / "README.md").is_file()  # the card, from the installed hf_sdft.model_cards template
