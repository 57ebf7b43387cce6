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
                     "hf_sdft.compress.checkpoint", "hf_sdft.trainer.fused", "hf_sdft.modeling",
                     "hf_sdft.data"):
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


# The layers, top to bottom: a module may import its own package and the layers below it, never
# a layer above it nor a sibling package of its own layer. ``hf_sdft`` itself (the public API) sits on top.
LAYERS = (
    ("hf_sdft",),
    ("hf_sdft.cli", "hf_sdft.metrics"),  # metrics: evaluate scripts built on the jobs' measurements
    ("hf_sdft.jobs", "hf_sdft.eval_tasks"),
    ("hf_sdft.trainer", "hf_sdft.export"),  # export: writes saved students in serving formats
    ("hf_sdft.compress", "hf_sdft.cka"),
    ("hf_sdft.modeling", "hf_sdft.data", "hf_sdft.distributed"),
)


def owner(module: str) -> tuple[int, str]:
    """(layer index, 0 = top; the package of the layer that holds ``module``)."""
    best = None
    for depth, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[1])):
                best = (depth, package)
    assert best is not None, module
    return best


def every_module() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["hf_sdft", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def upward_imports(modules: dict[str, Path]) -> dict[str, list[str]]:
    offenders = {}
    for module, path in modules.items():
        depth, package = owner(module)
        bad = []
        for name in imported_modules(path, module):
            if not name.startswith("hf_sdft.") or name.startswith(package + ".") or name == package:
                continue
            if name not in modules and name.rpartition(".")[0] in modules:
                name = name.rpartition(".")[0]  # ``from package import name``: a function, not a module
            their_depth, their_package = owner(name)
            if their_depth <= depth:
                bad.append(name)
        if bad:
            offenders[module] = sorted(set(bad))
    return offenders


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(every_module()) == {}


def unexplained_lazy_imports(path: Path) -> list[int]:
    """Lines of function-level imports of a project module with no ``# lazy: why`` comment, on the
    line or heading the block of imports it belongs to."""
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            project = (isinstance(node, ast.ImportFrom) and node.level) or any(n.startswith("hf_sdft") for n in names)
            if not project:
                continue
            above = node.lineno - 2  # the comment may head a block of imports (blank lines between allowed)
            while above >= 0 and (not lines[above].strip() or lines[above].lstrip().startswith(("from ", "import "))):
                above -= 1
            if "# lazy" not in lines[node.lineno - 1] and not (above >= 0 and lines[above].strip().startswith("# lazy")):
                found.append(node.lineno)
    return sorted(set(found))


def test_every_function_level_project_import_says_why_it_is_lazy():
    offenders = {m: lines for m, p in every_module().items() if (lines := unexplained_lazy_imports(p))}
    assert offenders == {}


def test_the_layer_checks_see_offenders(tmp_path):
    """Neither check is vacuous: an upward import and an unexplained lazy one are found."""
    module = tmp_path / "mod.py"
    module.write_text("from hf_sdft.trainer.teacher import teacher_context\n\n\ndef f():\n"
                      "    from hf_sdft.data import pad\n    # lazy: why\n    from hf_sdft.data import pad as p\n")
    assert "hf_sdft.trainer.teacher" in upward_imports({"hf_sdft.cka.mod": module})["hf_sdft.cka.mod"]
    assert unexplained_lazy_imports(module) == [5]


def test_the_old_losses_path_still_imports_with_a_deprecation_warning():
    import importlib

    import pytest

    sys.modules.pop("hf_sdft.losses", None)
    with pytest.warns(DeprecationWarning, match="hf_sdft.trainer.losses"):
        old = importlib.import_module("hf_sdft.losses")
    from hf_sdft.trainer.fused import fused_linear_kd_ce_loss
    from hf_sdft.trainer.losses import distillation_loss

    assert old.distillation_loss is distillation_loss and old.fused_linear_kd_ce_loss is fused_linear_kd_ce_loss


def test_importing_compress_loads_no_quanto():
    code = ("import sys, hf_sdft, hf_sdft.compress, hf_sdft.trainer.sdft_trainer, hf_sdft.cka\n"
            "print(any(m.startswith('optimum.quanto') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
