"""``evaluate`` metric modules shipped with the package, loadable offline by path:

    import evaluate
    from hf_sdft.metrics import metric_path
    ppl = evaluate.load(metric_path("perplexity")).compute(predictions=texts, model_id="outputs/quanto-int4")
"""

from importlib import resources


def metric_path(name: str) -> str:
    """Folder of a shipped metric module: ``perplexity`` or ``cka``."""
    path = resources.files("hf_sdft") / "metrics" / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no shipped metric {name!r}: choose perplexity or cka")
    return str(path)
