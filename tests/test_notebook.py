"""The quickstart notebook runs top to bottom (tiny budget) and writes its model card."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    out = tmp_path / "out"
    overrides = {"MAX_STEPS": 3, "OUTPUT_DIR": str(out)}  # the embedded default model, a tiny budget
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert "MAX_STEPS = 300" in params.source
    params.source += "".join(f"\n{k} = {v!r}" for k, v in overrides.items())

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "recovered perplexity" in text and f"model card: {out / 'README.md'}" in text
    assert "| precision: float32" in text  # CPU (a GPU: bf16, or fp16 without native bf16)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # per-layer CKA and its history
    assert (out / "README.md").exists() and (out / "cka_per_layer.png").exists()
