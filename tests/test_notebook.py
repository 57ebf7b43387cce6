"""The quickstart notebook runs top to bottom (tiny budget) and writes its model card."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from hf_sdft.data import default_model_path

from .helpers import make_model, make_texts, make_tokenizer

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    out = tmp_path / "out"
    overrides = {"MAX_STEPS": 3, "OUTPUT_DIR": str(out)}
    if not (Path(default_model_path()) / "config.json").exists():  # the embedded model is not trained yet
        make_model().save_pretrained(tmp_path / "model")
        make_tokenizer().save_pretrained(tmp_path / "model")
        for name, n, seed in [("train", 200, 1), ("eval", 60, 2)]:
            (tmp_path / f"{name}.txt").write_text("\n".join(make_texts(n, seed=seed)))
        overrides |= {"MODEL_NAME_OR_PATH": str(tmp_path / "model"), "TRAIN_FILE": str(tmp_path / "train.txt"),
                      "EVAL_FILE": str(tmp_path / "eval.txt"), "BLOCK_SIZE": 32}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert "MAX_STEPS = 300" in params.source
    params.source += "".join(f"\n{k} = {v!r}" for k, v in overrides.items())

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "recovered perplexity" in text and f"model card: {out / 'README.md'}" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # per-layer CKA and its history
    assert (out / "README.md").exists() and (out / "cka_per_layer.png").exists()
