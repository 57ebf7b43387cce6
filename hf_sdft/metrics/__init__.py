"""``evaluate`` metric modules shipped with the package, loadable offline by path:

    import evaluate
    from hf_sdft.metrics import metric_path
    ppl = evaluate.load(metric_path("perplexity")).compute(predictions=texts, model_id="outputs/quanto-int2")
"""

from importlib import resources


def text_metric_info(doc: str, citation: str, inputs: str):
    """``evaluate.MetricInfo`` of a metric whose predictions are texts."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=doc, citation=citation, inputs_description=inputs,
                               features=datasets.Features({"predictions": datasets.Value("string")}))


def metric_path(name: str) -> str:
    """Folder of a shipped metric module: ``perplexity`` or ``cka``."""
    path = resources.files("hf_sdft") / "metrics" / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no shipped metric {name!r}: choose perplexity or cka")
    return str(path)
