"""A user's interpreter without hf-sdft: load each exported folder with transformers alone and
compare it with the student's reference (its computed weights and logits).

    python tests/export/client.py JOBS.json RESULTS.json

JOBS.json: ``[{"name", "folder", "format", "reference"}]``; each reference is a ``torch.save``d
``{"weights": {name: tensor}, "ids": LongTensor, "logits": FloatTensor}``. compressed-tensors is
loaded twice: as transformers loads it by default (compressed layers) and with ``dequantize=True``.
"""

import json
import sys

sys.modules["hf_sdft"] = None  # `import hf_sdft` raises ImportError: nothing here may need it

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402


def compare(model, reference, weights: bool) -> dict:
    out = {}
    with torch.no_grad():
        logits = model(input_ids=reference["ids"]).logits
    out["max_logits_diff"] = (logits - reference["logits"]).abs().max().item()
    if weights:
        state = model.state_dict()
        missing = sorted(set(reference["weights"]) - set(state))
        out["missing"] = missing
        out["max_weight_diff"] = max((state[k].float() - v.float()).abs().max().item()
                                     for k, v in reference["weights"].items() if k in state)
        out["dtypes"] = sorted({str(state[k].dtype) for k in reference["weights"] if k in state})
    return out


def main(jobs_path: str, results_path: str) -> None:
    try:
        import hf_sdft  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_sdft is importable: the check would not be without it")
    results = {}
    for job in json.load(open(jobs_path)):
        reference = torch.load(job["reference"])
        folder, fmt = job["folder"], job["format"]
        loads = {"default": {}}
        if fmt == "gguf":
            loads = {"default": {"gguf_file": "model.gguf"}}
        elif fmt == "compressed-tensors":
            loads["dequantize"] = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        for how, kwargs in loads.items():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
            # the default compressed-tensors load keeps packed weights: only its logits compare
            weights = not (fmt == "compressed-tensors" and how == "default")
            results[f"{job['name']}|{fmt}|{how}"] = compare(model, reference, weights) | {
                "class": type(model.get_submodule("model.layers.0.mlp.down_proj")).__name__}
    json.dump(results, open(results_path, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
