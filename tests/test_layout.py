"""The package's architecture: the library (the trainers, CKA, compression, data, model
introspection) never imports a job (``hf_sdft.jobs``, the CLI), at import time or lazily."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import hf_sdft

PACKAGE = Path(hf_sdft.__file__).resolve().parent
JOBS = ("hf_sdft.jobs", "hf_sdft.cli")
# hf_sdft.metrics holds evaluate metric scripts, loaded by path and built on the jobs' measurements
OUTSIDE_LIBRARY = ("jobs", "cli.py", "metrics", "eval_tasks", "model_cards")


def library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in OUTSIDE_LIBRARY:
            continue
        parts = ["hf_sdft", *rel.with_suffix("").parts]
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (function-level too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_library_has_the_expected_packages():
    modules = library_modules()
    for expected in ("hf_sdft.trainer.sdft_trainer", "hf_sdft.trainer.losses", "hf_sdft.cka.callback",
                     "hf_sdft.compress.student", "hf_sdft.modeling", "hf_sdft.data"):
        assert expected in modules
    assert not any(m.startswith(JOBS) for m in modules)


def test_no_library_module_names_a_job_in_any_import():
    offenders = {}
    for module in library_modules():
        rel = Path(*module.split(".")[1:])
        path = PACKAGE / rel / "__init__.py" if (PACKAGE / rel).is_dir() else PACKAGE / rel.with_suffix(".py")
        bad = sorted(m for m in imported_modules(path, module) if m.startswith(JOBS))
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_importing_every_library_module_loads_no_job():
    code = ("import json, sys, importlib\n"
            f"for name in {library_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hf_sdft'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "hf_sdft.trainer.sdft_trainer" in loaded  # the check saw the library itself
    assert [m for m in loaded if m.startswith(JOBS)] == []


def test_the_checker_sees_a_lazy_job_import(tmp_path):
    """The static check is not vacuous: an import inside a function body is found."""
    module = tmp_path / "mod.py"
    module.write_text("def f():\n    from hf_sdft.jobs.cards import write_card\n    from ..jobs import recover\n")
    found = imported_modules(module, "hf_sdft.trainer.mod")
    assert "hf_sdft.jobs.cards" in found and "hf_sdft.jobs.recover" in found


def test_public_imports_keep_working():
    from hf_sdft import CKACallback, SDFTConfig, SDFTSFTConfig, SDFTSFTTrainer, SDFTTrainer, distillation_loss
    from hf_sdft.trainer import SDFTTrainer as Same

    assert Same is SDFTTrainer
    assert all(callable(x) for x in (CKACallback, SDFTConfig, SDFTSFTConfig, SDFTSFTTrainer, distillation_loss))
